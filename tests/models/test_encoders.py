"""Encoders (small ones, open_clip towers, Hugging Face text models) and MultimodalModel parts.

Nothing here downloads: open_clip and Hugging Face models are tiny architectures written to
tmp folders and loaded through the libraries' real loading paths (`open_clip.create_model`,
`from_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import mmfed  # noqa: F401  (installs the torchvision guard; open_clip/transformers are imported lazily)
from mmfed.config import ConfigError, instantiate, node_for, registered
from mmfed.models.encoders import (
    GRUText,
    HFTextEncoder,
    OpenCLIPImageEncoder,
    OpenCLIPTextEncoder,
    PretrainedLoadError,
    SmallCNN,
    SmallTransformerText,
)
from mmfed.models.multimodal import KIND_PARTS, PARTS, MultimodalModel, build_model

CAPTIONS = ["a red circle on the left", "two blue squares", "a small green triangle above a big circle"]
LONG = " ".join(f"word{i}" for i in range(30))


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make any Hugging Face Hub access fail at once (huggingface_hub reads the variable at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_all_parameters_get_gradients(module: nn.Module, loss: torch.Tensor) -> None:
    module.zero_grad()
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def random_loss(out: torch.Tensor) -> torch.Tensor:
    # A random direction (not out.sum(): the sum of a LayerNorm output has ~zero gradient).
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum()


# ----------------------------------------------------------------------------- small encoders
def small_text_encoders() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        SmallTransformerText(width=16, layers=2, heads=2, vocab_size=128, max_length=16),
        GRUText(width=16, vocab_size=128, max_length=16),
    ]


def test_small_cnn_shapes_and_output_dim() -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(width=8, image_size=32, feature_grid=2)
    assert cnn.output_dim == 4 * 8 * 2 * 2
    pixels = cnn.prepare(images(3))
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    assert cnn(pixels).shape == (3, cnn.output_dim)
    # uint8 range maps onto [-1, 1].
    edges = cnn.prepare(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 32, 32))
    assert torch.allclose(edges[0], torch.full_like(edges[0], -1.0))
    assert torch.allclose(edges[1], torch.full_like(edges[1], 1.0))


def test_small_cnn_prepare_resizes_other_image_sizes() -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(width=8, image_size=32)
    for size in (48, 20, 64):
        raw = images(2, size)
        pixels = cnn.prepare(raw)
        assert pixels.shape == (2, 3, 32, 32)
        assert pixels.min() >= -1.0 - 1e-5 and pixels.max() <= 1.0 + 1e-5
        assert cnn(pixels).shape == (2, cnn.output_dim)
    # A flat image stays flat after resizing.
    flat = cnn.prepare(torch.full((1, 3, 48, 48), 200, dtype=torch.uint8))
    assert torch.allclose(flat, torch.full_like(flat, 200 / 127.5 - 1), atol=1e-5)
    # The input is not modified.
    raw = images(1, 32)
    before = raw.clone()
    cnn.prepare(raw)
    assert torch.equal(raw, before)


def test_small_cnn_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(width=8, image_size=16, feature_grid=2)
    assert_all_parameters_get_gradients(cnn, random_loss(cnn(cnn.prepare(images(2, 16)))))


@pytest.mark.parametrize("kwargs", [{"image_size": 20}, {"image_size": 8}, {"width": 0}])
def test_small_cnn_rejects_bad_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SmallCNN(**kwargs)


def test_small_text_encoders_shapes_and_output_dim() -> None:
    transformer, gru = small_text_encoders()
    assert transformer.output_dim == 16 and gru.output_dim == 32
    for encoder in (transformer, gru):
        tokens = encoder.prepare(CAPTIONS)
        assert set(tokens) == {"input_ids", "attention_mask"}
        assert tokens["input_ids"].shape[0] == len(CAPTIONS)
        out = encoder(tokens)
        assert out.shape == (len(CAPTIONS), encoder.output_dim)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("index", [0, 1], ids=["transformer", "gru"])
def test_small_text_encoders_are_padding_invariant(index: int) -> None:
    encoder = small_text_encoders()[index].eval()
    with torch.no_grad():
        alone = encoder(encoder.prepare(["two blue squares"]))
        batched = encoder(encoder.prepare(["two blue squares", LONG]))
        assert encoder.prepare(["two blue squares", LONG])["input_ids"].shape[1] == 16  # much longer
        assert torch.allclose(alone[0], batched[0], atol=1e-5), (alone[0] - batched[0]).abs().max()
        # ... and wherever it sits in the batch.
        last = encoder(encoder.prepare([LONG, "a", "two blue squares"]))
        assert torch.allclose(alone[0], last[2], atol=1e-5)


@pytest.mark.parametrize("index", [0, 1], ids=["transformer", "gru"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_small_text_encoders_give_finite_embeddings_for_texts_without_words(index: int, train: bool) -> None:
    encoder = small_text_encoders()[index].train(train)
    with torch.no_grad():
        for texts in (["", "a cat"], ["!!!"], [""]):
            out = encoder(encoder.prepare(texts))
            assert out.shape == (len(texts), encoder.output_dim)
            assert torch.isfinite(out).all(), texts
        # A wordless text does not change its neighbours' embeddings.
        encoder.eval()
        assert torch.allclose(
            encoder(encoder.prepare(["", "a cat"]))[1], encoder(encoder.prepare(["a cat"]))[0], atol=1e-5
        )


@pytest.mark.parametrize("index", [0, 1], ids=["transformer", "gru"])
def test_small_text_encoders_gradients_reach_every_parameter(index: int) -> None:
    encoder = small_text_encoders()[index].train()
    out = encoder(encoder.prepare(CAPTIONS))
    assert_all_parameters_get_gradients(encoder, random_loss(out))
    # The padding row of the embedding never gets a gradient (padding_idx=0).
    assert encoder.embedding.weight.grad[0].abs().sum() == 0


def test_small_transformer_rejects_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="heads"):
        SmallTransformerText(width=10, heads=4)


# ----------------------------------------------------------------------------- open_clip
TINY_CLIP: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Register ``mmfed-tiny-clip`` (CLIP) and ``mmfed-tiny-clip-custom`` (CustomTextCLIP) with open_clip."""
    import open_clip
    from open_clip import factory

    saved_paths, saved_configs = list(factory._MODEL_CONFIG_PATHS), dict(factory._MODEL_CONFIGS)
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / "mmfed-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    (folder / "mmfed-tiny-clip-custom.json").write_text(json.dumps({**TINY_CLIP, "custom_text": True}))
    open_clip.add_model_config(folder)
    yield open_clip
    factory._MODEL_CONFIG_PATHS[:] = saved_paths
    factory._MODEL_CONFIGS = saved_configs


def test_tiny_clip_config_uses_open_clips_own_keys(tiny_clip: Any) -> None:
    import dataclasses

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    reference = json.loads((Path(tiny_clip.__file__).parent / "model_configs" / "ViT-B-32.json").read_text())
    assert set(TINY_CLIP) == set(reference)
    assert set(reference["text_cfg"]) <= set(TINY_CLIP["text_cfg"])
    assert set(TINY_CLIP["vision_cfg"]) <= {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    assert set(TINY_CLIP["text_cfg"]) <= {f.name for f in dataclasses.fields(CLIPTextCfg)}
    assert "mmfed-tiny-clip" in tiny_clip.list_models()


def test_open_clip_image_tower(tiny_clip: Any) -> None:
    torch.manual_seed(0)
    encoder = OpenCLIPImageEncoder(model_name="mmfed-tiny-clip", pretrained=None)
    assert encoder.output_dim == 32 and encoder.image_size == (32, 32)
    assert encoder.visual.transformer.width == 32 and len(encoder.visual.transformer.resblocks) == 1  # tiny
    pixels = encoder.prepare(images(2, 48))
    assert pixels.shape == (2, 3, 32, 32)
    assert encoder(pixels).shape == (2, 32)
    assert encoder(encoder.prepare(images(3, 32))).shape == (3, 32)
    # Scaled to [0, 1] then normalized with the tower's mean/std, also after resizing.
    white = encoder.prepare(torch.full((1, 3, 48, 48), 255, dtype=torch.uint8))
    assert torch.allclose(white, ((1 - encoder.mean) / encoder.std).expand_as(white), atol=1e-4)
    assert_all_parameters_get_gradients(encoder, random_loss(encoder(pixels)))


@pytest.mark.parametrize("name", ["mmfed-tiny-clip", "mmfed-tiny-clip-custom"])
def test_open_clip_text_tower(tiny_clip: Any, name: str) -> None:
    torch.manual_seed(0)
    encoder = OpenCLIPTextEncoder(model_name=name, pretrained=None)
    assert encoder.output_dim == 32
    assert encoder.model.visual is None  # the image tower is dropped
    tokens = encoder.prepare(CAPTIONS)
    assert tokens["input_ids"].shape == (3, 77)
    out = encoder(tokens)
    assert out.shape == (3, 32) and torch.isfinite(out).all()


def test_open_clip_towers_load_a_local_checkpoint(tiny_clip: Any, tmp_path: Path) -> None:
    torch.manual_seed(123)
    reference = tiny_clip.create_model("mmfed-tiny-clip", pretrained=None).eval()
    checkpoint = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), checkpoint)

    torch.manual_seed(0)  # different random init: equal outputs below come from the checkpoint
    image = OpenCLIPImageEncoder(model_name="mmfed-tiny-clip", pretrained=str(checkpoint)).eval()
    text = OpenCLIPTextEncoder(model_name="mmfed-tiny-clip", pretrained=str(checkpoint)).eval()
    random_image = OpenCLIPImageEncoder(model_name="mmfed-tiny-clip", pretrained=None).eval()
    with torch.no_grad():
        pixels = image.prepare(images(2, 48))
        assert torch.allclose(image(pixels), reference.encode_image(pixels), atol=1e-6)
        assert not torch.allclose(random_image(pixels), reference.encode_image(pixels), atol=1e-3)
        ids = text.prepare(CAPTIONS)["input_ids"]
        assert torch.allclose(text(text.prepare(CAPTIONS)), reference.encode_text(ids), atol=1e-6)
    # Loading twice gives the same weights.
    again = OpenCLIPImageEncoder(model_name="mmfed-tiny-clip", pretrained=str(checkpoint))
    for key, value in image.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


@pytest.mark.parametrize("cls", [OpenCLIPImageEncoder, OpenCLIPTextEncoder])
def test_open_clip_unknown_model_name_is_a_value_error(tiny_clip: Any, cls: type) -> None:
    with pytest.raises(ValueError, match="mmfed-no-such-model"):
        cls(model_name="mmfed-no-such-model")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cls", [OpenCLIPImageEncoder, OpenCLIPTextEncoder])
@pytest.mark.parametrize(
    ("name", "tag"),
    [("ViT-B-32", "openai"), ("mmfed-tiny-clip", "openai"), ("mmfed-tiny-clip", "/no/such/checkpoint.pt")],
)
def test_open_clip_pretrained_that_needs_a_download_fails_clearly_offline(
    tiny_clip: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cls: type,
    name: str,
    tag: str,
) -> None:
    offline(monkeypatch, tmp_path)
    with pytest.raises(PretrainedLoadError) as caught:
        cls(model_name=name, pretrained=tag, cache_dir=str(tmp_path / "cache"))
    message = str(caught.value)
    assert name in message and tag in message
    assert "HF_HUB_OFFLINE is set" in message
    downloaded = [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".bin", ".pt", ".safetensors")]
    assert not downloaded


# ----------------------------------------------------------------------------- Hugging Face
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"a an the red blue green circle square squares triangle two small big on left above".split(),
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A tiny BERT and its tokenizer saved with save_pretrained into one folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab_file))
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_hf_text_encoder_loads_a_local_folder(tiny_bert: tuple[Path, nn.Module]) -> None:
    folder, reference = tiny_bert
    encoder = HFTextEncoder(model=str(folder), pretrained=True, local_files_only=True).eval()
    assert encoder.output_dim == 32
    tokens = encoder.prepare(CAPTIONS)
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert (tokens["input_ids"][:, 0] == VOCAB.index("[CLS]")).all()
    assert not (tokens["input_ids"] == VOCAB.index("[UNK]")).any()  # the vocab file was used
    out = encoder(tokens)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    for key, value in reference.state_dict().items():  # the saved weights were loaded
        assert torch.equal(encoder.model.state_dict()[key], value), key
    # Truncation to max_length.
    short = HFTextEncoder(model=str(folder), local_files_only=True, max_length=4)
    assert short.prepare([LONG])["input_ids"].shape == (1, 4)


def test_hf_text_encoder_without_pretrained_has_random_weights_and_the_same_architecture(
    tiny_bert: tuple[Path, nn.Module],
) -> None:
    folder, _ = tiny_bert
    loaded = HFTextEncoder(model=str(folder), pretrained=True, local_files_only=True).eval()
    torch.manual_seed(1)
    fresh = HFTextEncoder(model=str(folder), pretrained=False, local_files_only=True).eval()
    assert type(fresh.model) is type(loaded.model)
    shapes = {k: v.shape for k, v in loaded.model.state_dict().items()}
    assert {k: v.shape for k, v in fresh.model.state_dict().items()} == shapes
    differ = [
        k
        for k, v in fresh.model.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, loaded.model.state_dict()[k])
    ]
    assert any("encoder.layer" in k for k in differ)
    with torch.no_grad():
        tokens = loaded.prepare(CAPTIONS)
        assert not torch.allclose(fresh(tokens), loaded(tokens), atol=1e-4)


def test_hf_text_encoder_poolings(tiny_bert: tuple[Path, nn.Module]) -> None:
    folder, reference = tiny_bert
    mean = HFTextEncoder(model=str(folder), local_files_only=True, pooling="mean").eval()
    cls = HFTextEncoder(model=str(folder), local_files_only=True, pooling="cls").eval()
    with torch.no_grad():
        tokens = mean.prepare(CAPTIONS)
        hidden = reference(**tokens).last_hidden_state  # [B, L, 32]
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        assert torch.allclose(cls(tokens), hidden[:, 0], atol=1e-5)
        assert torch.allclose(mean(tokens), (hidden * mask).sum(1) / mask.sum(1), atol=1e-5)
        assert not torch.allclose(mean(tokens), cls(tokens), atol=1e-3)
        # Mean pooling ignores padding.
        alone = mean(mean.prepare(["two blue squares"]))
        batched = mean(mean.prepare(["two blue squares", CAPTIONS[2]]))
        assert torch.allclose(alone[0], batched[0], atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        HFTextEncoder(model=str(folder), local_files_only=True, pooling="max")


def test_hf_text_encoder_gradients(tiny_bert: tuple[Path, nn.Module]) -> None:
    folder, _ = tiny_bert
    encoder = HFTextEncoder(model=str(folder), local_files_only=True).train()
    out = encoder(encoder.prepare(CAPTIONS))
    encoder.zero_grad()
    random_loss(out).backward()
    # BERT's pooler is not used by either pooling; every encoder layer must learn.
    missing = [n for n, p in encoder.named_parameters() if "pooler" not in n and p.grad is None]
    assert not missing


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pretrained", [True, False])
@pytest.mark.parametrize("kind", ["missing_folder", "unknown_hub_id"])
def test_hf_text_encoder_missing_model_raises_pretrained_load_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str, pretrained: bool
) -> None:
    offline(monkeypatch, tmp_path)
    name = str(tmp_path / "no-such-folder") if kind == "missing_folder" else "mmfed-test/no-such-model"
    with pytest.raises(PretrainedLoadError) as caught:
        HFTextEncoder(model=name, pretrained=pretrained, local_files_only=True)
    assert name in str(caught.value)


# ----------------------------------------------------------------------------- registry
SMALL = {"model/image_encoder": {"cnn", "vit"}, "model/text_encoder": {"transformer", "gru"}}
LOADED = {"model/image_encoder": {"open_clip"}, "model/text_encoder": {"open_clip", "hf"}}


@pytest.mark.parametrize("group", sorted(SMALL))
def test_every_registered_encoder_is_covered(group: str) -> None:
    names = set(registered(group))
    assert names == SMALL[group] | LOADED[group], "a new encoder needs a test here"


@pytest.mark.parametrize(("group", "name"), [(g, n) for g in sorted(SMALL) for n in sorted(SMALL[g])])
def test_small_registered_encoders_build_from_their_default_config(group: str, name: str) -> None:
    cls = registered(group)[name]
    cfg = OmegaConf.structured(node_for(cls))
    assert cfg._target_ == f"{cls.__module__}.{cls.__qualname__}"
    torch.manual_seed(0)
    encoder = instantiate(cfg, group.replace("/", "."))
    assert type(encoder) is cls
    raw = images(2, 48) if group == "model/image_encoder" else CAPTIONS
    assert encoder(encoder.prepare(raw)).shape == (len(raw), encoder.output_dim)


def test_loaded_encoders_build_from_their_config(tiny_clip: Any, tiny_bert: tuple[Path, nn.Module]) -> None:
    folder, _ = tiny_bert
    overrides = {
        ("model/image_encoder", "open_clip"): {"model_name": "mmfed-tiny-clip"},
        ("model/text_encoder", "open_clip"): {"model_name": "mmfed-tiny-clip"},
        ("model/text_encoder", "hf"): {"model": str(folder), "local_files_only": True},
    }
    assert set(overrides) == {(g, n) for g in LOADED for n in LOADED[g]}
    for (group, name), values in overrides.items():
        cls = registered(group)[name]
        cfg = OmegaConf.merge(OmegaConf.structured(node_for(cls)), values)
        encoder = instantiate(cfg, group.replace("/", "."))
        assert type(encoder) is cls and encoder.output_dim == 32


def test_bad_encoder_config_names_the_key() -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(node_for(SmallCNN)), {"image_size": 20})
    with pytest.raises(ConfigError, match="model.image_encoder"):
        instantiate(cfg, "model.image_encoder")
    with pytest.raises(Exception, match="no_such_key"):  # struct mode rejects unknown keys
        OmegaConf.merge(OmegaConf.structured(node_for(SmallCNN)), {"no_such_key": 1})


# ----------------------------------------------------------------------------- MultimodalModel parts
def model_cfg() -> Any:
    image = OmegaConf.merge(OmegaConf.structured(node_for(SmallCNN)), {"width": 8, "image_size": 16})
    text = OmegaConf.merge(OmegaConf.structured(node_for(GRUText)), {"width": 8, "vocab_size": 64})
    return OmegaConf.create(
        {"embed_dim": 16, "init_temperature": 0.07, "image_encoder": image, "text_encoder": text}
    )


def build(parts: tuple[str, ...] = PARTS, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    return build_model(model_cfg(), parts, num_image_classes=3, num_text_classes=4).eval()


def test_build_model_parts_and_shapes() -> None:
    model = build()
    assert model.part_names == PARTS
    assert model.encode_images(images(2, 16)).shape == (2, 16)
    assert model.encode_texts(CAPTIONS).shape == (3, 16)
    assert torch.allclose(model.encode_texts(CAPTIONS, normalize=True).norm(dim=-1), torch.ones(3))
    assert model.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    image_only = build(KIND_PARTS["image"])
    assert image_only.part_names == ("image_encoder", "image_head")
    assert image_only.has("image_head") and not image_only.has("text_encoder")


def test_part_state_round_trip_between_two_models() -> None:
    source, target = build(seed=0), build(seed=1)
    state = source.part_state()
    assert {key.partition("/")[0] for key in state} == set(PARTS)
    assert all("/" in key for key in state)
    with torch.no_grad():
        assert not torch.allclose(source.encode_texts(CAPTIONS), target.encode_texts(CAPTIONS))
    assert sorted(target.load_part_state(state)) == sorted(PARTS)
    for key, value in target.part_state().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        raw = images(2, 16)
        assert torch.equal(source.encode_images(raw), target.encode_images(raw))
        assert torch.equal(source.encode_texts(CAPTIONS), target.encode_texts(CAPTIONS))


def test_part_state_of_some_parts_loads_only_those() -> None:
    source, target = build(seed=0), build(seed=1)
    image_before = {k: v.clone() for k, v in target.part_state(["image_encoder"]).items()}
    state = source.part_state(["text_encoder", "logit_scale"])
    assert {key.partition("/")[0] for key in state} == {"text_encoder", "logit_scale"}
    assert sorted(target.load_part_state(state)) == ["logit_scale", "text_encoder"]
    for key, value in target.part_state(["image_encoder"]).items():
        assert torch.equal(value, image_before[key])
    for key, value in target.part_state(["text_encoder"]).items():
        assert torch.equal(value, state[key])


def test_load_part_state_rejects_parts_the_model_lacks() -> None:
    full, image_only = build(seed=0), build(KIND_PARTS["image"], seed=1)
    state = full.part_state()
    with pytest.raises(KeyError, match="text_encoder"):
        image_only.load_part_state(state)
    # Non-strict: the parts it has are loaded, the others skipped.
    assert sorted(image_only.load_part_state(state, strict_parts=False)) == ["image_encoder", "image_head"]
    for key, value in image_only.part_state().items():
        assert torch.equal(value, state[key])
