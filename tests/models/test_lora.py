"""LoRA adapters (peft) on every encoder kind: placement, effect, frozen base, naming, save/load.

Tiny models only; the Hugging Face and open_clip ones are built from configs in tmp folders and
loaded through the libraries' real paths, as in test_encoders.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mmfed  # noqa: F401  (torchvision guard before peft/transformers import)
from mmfed.models.encoders import GRUText, SmallCNN, SmallTransformerText, SmallViT
from mmfed.models.lora import (
    AdaptedModel,
    LoraSettings,
    add_adapters,
    base_name,
    default_targets,
    is_personal,
    load_adapted_tower,
    resolve_targets,
)
from mmfed.models.multimodal import MultimodalModel, Tower

CAPTIONS = ["a red circle on the left", "two blue squares", "a", "a small green triangle above a circle"]


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def randomize_adapters(model: nn.Module, where: Callable[[str], bool] = lambda name: True) -> None:
    """One LoRA factor starts at zero (adapter = identity); give the chosen adapters a real effect."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and where(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


# ----------------------------------------------------------------------------- encoders of each kind
def tiny_bert_folder(root: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "a red blue green circle square squares triangle small on the left two above".split()
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(root / "vocab.txt"))
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,  # so training mode computes what eval mode does
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return root / "bert"


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def clip_name(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import open_clip
    from open_clip import factory

    saved_paths, saved_configs = list(factory._MODEL_CONFIG_PATHS), dict(factory._MODEL_CONFIGS)
    folder = tmp_path_factory.mktemp("open_clip_configs")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (folder / "mmfed-lora-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    yield "mmfed-lora-clip"
    factory._MODEL_CONFIG_PATHS[:] = saved_paths
    factory._MODEL_CONFIGS = saved_configs


def make(kind: str, request: pytest.FixtureRequest) -> tuple[str, Tower, Any]:
    """(part, tower, raw input) for an encoder kind."""
    torch.manual_seed(0)
    if kind == "cnn":
        return "image_encoder", Tower(SmallCNN(width=8, feature_grid=2), 8), images()
    if kind == "vit":
        return "image_encoder", Tower(SmallViT(width=16, layers=1, heads=2, patch_size=8), 8), images()
    if kind == "transformer":
        encoder = SmallTransformerText(width=16, layers=1, heads=2, vocab_size=64, max_length=16)
        return "text_encoder", Tower(encoder, 8), CAPTIONS
    if kind == "gru":
        return "text_encoder", Tower(GRUText(width=16, vocab_size=64, max_length=16), 8), CAPTIONS
    if kind == "hf":
        from mmfed.models.encoders import HFTextEncoder

        folder = request.getfixturevalue("bert_folder")
        encoder = HFTextEncoder(model=str(folder), pretrained=True, local_files_only=True, max_length=16)
        return "text_encoder", Tower(encoder, 8), CAPTIONS
    from mmfed.models.encoders import OpenCLIPImageEncoder, OpenCLIPTextEncoder

    name = request.getfixturevalue("clip_name")
    if kind == "open_clip_image":
        return "image_encoder", Tower(OpenCLIPImageEncoder(model_name=name), 8), images()
    return "text_encoder", Tower(OpenCLIPTextEncoder(model_name=name), 8), CAPTIONS


def encode(model: MultimodalModel, part: str, raw: Any) -> torch.Tensor:
    return model.encode_images(raw) if part == "image_encoder" else model.encode_texts(raw)


# Expected placement: layer types per kind, and names that must (not) be targeted.
LAYER = "encoder.encoder.layers.0"
HF_ATTENTION = "encoder.model.encoder.layer.0.attention.self"
CLIP_IMAGE, CLIP_TEXT = "encoder.visual.transformer.resblocks.0", "encoder.model.transformer.resblocks.0"
ATTENTION = {nn.MultiheadAttention, nn.Linear}
PLACEMENT: dict[str, tuple[set[type], list[str]]] = {
    "cnn": ({nn.Conv2d, nn.Linear}, ["encoder.features.0", "encoder.features.11", "projection"]),
    "vit": (ATTENTION, [f"{LAYER}.self_attn", f"{LAYER}.linear1"]),
    "transformer": (ATTENTION, [f"{LAYER}.self_attn", f"{LAYER}.linear2"]),
    "gru": ({nn.Embedding, nn.Linear}, ["encoder.embedding", "projection"]),
    "hf": ({nn.Linear}, [f"{HF_ATTENTION}.query", f"{HF_ATTENTION}.value"]),
    "open_clip_image": (ATTENTION, [f"{CLIP_IMAGE}.attn", f"{CLIP_IMAGE}.mlp.c_fc"]),
    "open_clip_text": (ATTENTION, [f"{CLIP_TEXT}.attn", f"{CLIP_TEXT}.mlp.c_proj"]),
}
KINDS = list(PLACEMENT)


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_per_encoder_kind(kind: str, request: pytest.FixtureRequest) -> None:
    _, tower, _ = make(kind, request)
    targets = default_targets(tower)
    types, required = PLACEMENT[kind]
    assert set(required) <= set(targets), targets
    assert "projection" in targets
    assert {type(tower.get_submodule(t)) for t in targets} <= types | {
        nn.modules.linear.NonDynamicallyQuantizableLinear
    }
    # never the out_proj of an attention module: nn.MultiheadAttention bypasses its forward
    assert not [t for t in targets if t.endswith("out_proj")]
    if kind == "hf":  # attention query/value only (peft's BERT defaults), not the feed-forward layers
        assert not [t for t in targets if t.endswith(("key", "dense"))]
    if kind == "cnn":  # convs only: never a norm layer
        assert not [t for t in targets if isinstance(tower.get_submodule(t), nn.BatchNorm2d)]


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_start_as_identity_and_then_change_the_output_in_eval_mode(
    kind: str, request: pytest.FixtureRequest
) -> None:
    part, tower, raw = make(kind, request)
    plain = MultimodalModel({part: tower}).eval()
    with torch.no_grad():
        before = encode(plain, part, raw)
    model = add_adapters(plain, LoraSettings(rank=2, alpha=4)).eval()
    placed = lora_layers(getattr(model, part))
    assert {base_name(n.removeprefix("base_model.model.")) for n in placed} >= set(PLACEMENT[kind][1])
    with torch.no_grad():
        assert torch.allclose(encode(model, part, raw), before, atol=1e-5)  # B = 0: same function
    # Every adapted layer *except the projection* gets an effect: the change must come from inside
    # the encoder (catches adapters that a fused fast path or a bypassed forward would ignore).
    randomize_adapters(model, lambda name: "projection" not in name)
    with torch.no_grad():
        after_eval = encode(model, part, raw)
    assert (after_eval - before).abs().max() > 1e-3
    # ... and eval under no_grad computes what training mode computes (no dropout in these towers)
    model.train()
    after_train = encode(model, part, raw).detach()
    assert torch.allclose(after_eval, after_train, atol=1e-4), (after_eval - after_train).abs().max()


@pytest.mark.parametrize("kind", ["vit", "transformer"])
def test_each_attention_adapter_changes_the_output_in_eval_mode(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Inside nn.TransformerEncoderLayer: attention in-projection, out-projection, feed-forward.

    PyTorch's eval fast path reads the layer's base weights; without `_fix_attention` each of
    these adapters would be ignored at evaluation. peft's out_proj adapter lives inside its
    MultiheadAttention LoRA layer (``self_attn.base_layer.out_proj``).
    """
    part, tower, raw = make(kind, request)
    model = add_adapters(MultimodalModel({part: tower}), LoraSettings(rank=2, alpha=4)).eval()
    with torch.no_grad():
        before = encode(model, part, raw)
    for selector in (
        lambda n: "self_attn.lora_" in n,
        lambda n: "out_proj.lora_" in n,
        lambda n: "linear1.lora_" in n,
    ):
        trial = copy.deepcopy(model)
        randomize_adapters(trial, selector)
        with torch.no_grad():
            assert (encode(trial, part, raw) - before).abs().max() > 1e-3


def test_a_lora_on_out_proj_alone_is_refused() -> None:
    """nn.MultiheadAttention reads out_proj.weight directly: such an adapter would silently do nothing."""
    tower = Tower(SmallTransformerText(width=16, layers=1, heads=2, vocab_size=64), 8)
    with pytest.raises(ValueError, match="text_target_modules.*MultiheadAttention"):
        resolve_targets(tower, ["out_proj"], "text_target_modules")
    with pytest.raises(ValueError, match="text_target_modules: 'nope' matches no module"):
        resolve_targets(tower, ["nope"], "text_target_modules")
    assert resolve_targets(tower, ["linear1", "projection"], "k") == [
        "encoder.encoder.layers.0.linear1",
        "projection",
    ]


def test_target_override_places_adapters_only_there() -> None:
    torch.manual_seed(0)
    tower = Tower(SmallTransformerText(width=16, layers=2, heads=2, vocab_size=64), 8)
    settings = LoraSettings(rank=2, text_target_modules=["linear2"])
    model = add_adapters(MultimodalModel({"text_encoder": tower}), settings)
    names = sorted(lora_layers(model.text_encoder))
    assert [n.rsplit(".", 1)[-1] for n in names] == ["linear2", "linear2"]


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="rank must be > 0"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.0)


def test_during_federation_attention_is_not_targeted_and_base_stays_trainable() -> None:
    """peft merges a MultiheadAttention adapter into the (frozen) weight at each forward, so with a
    trainable base only linear layers get adapters, and an explicit attention target is refused."""
    torch.manual_seed(0)
    tower = Tower(SmallTransformerText(width=16, layers=1, heads=2, vocab_size=64), 8)
    assert not [t for t in default_targets(tower, train_base=True) if t.endswith("self_attn")]
    model = add_adapters(
        MultimodalModel({"text_encoder": copy.deepcopy(tower)}), LoraSettings(), train_base=True
    )
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not frozen, frozen
    with pytest.raises(ValueError, match="text_target_modules.*frozen base"):
        add_adapters(
            MultimodalModel({"text_encoder": tower}),
            LoraSettings(text_target_modules=["self_attn"]),
            train_base=True,
        )


# ----------------------------------------------------------------------------- the personal model
def image_client_model(
    train_base: bool = False, personal_heads: bool = False
) -> tuple[MultimodalModel, AdaptedModel]:
    torch.manual_seed(0)
    plain = MultimodalModel(
        {"image_encoder": Tower(SmallCNN(width=8, feature_grid=2), 8), "image_head": nn.Linear(8, 3)}
    )
    reference = copy.deepcopy(plain)
    personal = ("image_head",) if personal_heads else ()
    return reference, add_adapters(
        plain, LoraSettings(rank=2), train_base=train_base, personal_parts=personal
    )


@pytest.mark.parametrize("kind", ["cnn", "vit", "transformer"])
def test_only_adapters_and_head_change_when_training(kind: str, request: pytest.FixtureRequest) -> None:
    """Bit-exact: batch-norm statistics (cnn) stay, and attention weights do not drift through
    peft's merge-forward-unmerge of its MultiheadAttention LoRA (vit, transformer)."""
    part, tower, raw = make(kind, request)
    head = "image_head" if part == "image_encoder" else "text_head"
    plain = MultimodalModel({part: tower, head: nn.Linear(8, 3)})
    reference = copy.deepcopy(plain)
    model = add_adapters(plain, LoraSettings(rank=2))
    before = {k: v.clone() for k, v in model.part_state().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    labels = torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        loss = nn.functional.cross_entropy(getattr(model, head)(encode(model, part, raw)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.part_state()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, "nothing trained"
    assert all("lora_" in k or k.startswith(f"{head}/") for k in changed), changed
    assert any("lora_" in k for k in changed) and any(k.startswith(f"{head}/") for k in changed)
    for key, value in reference.part_state([part]).items():  # equal to the global model's
        assert torch.equal(after[key], value), key


def test_adapted_model_uses_the_base_models_tensor_names() -> None:
    """So FedAvg averages base weights with the global model's, and adapters stay out."""
    reference, model = image_client_model(personal_heads=True)
    state = model.part_state()
    base = {k for k in state if "lora_" not in k}
    assert base == set(reference.part_state())
    # the server's payload (base names, no adapters) loads; adapters are untouched
    randomize_adapters(model)
    adapters = {k: v.clone() for k, v in model.part_state().items() if "lora_" in k}
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in reference.part_state().items()}
    assert model.load_part_state(shifted) == ["image_encoder", "image_head"]
    for key, value in model.part_state().items():
        expected = adapters[key] if "lora_" in key else shifted[key]
        assert torch.equal(value, expected), key
    # the client's state (adapters only) loads alone too
    zeros = {k: torch.zeros_like(v) for k, v in adapters.items()}
    model.load_part_state(zeros)
    assert all(not model.part_state()[k].any() for k in zeros)
    # a partial group is an error, naming the missing tensor
    partial = dict(list(shifted.items())[:-3])
    with pytest.raises(KeyError, match="is missing"):
        model.load_part_state({k: v for k, v in partial.items() if k.startswith("image_encoder/")})
    with pytest.raises(KeyError, match="not a tensor of part"):
        model.load_part_state({"image_encoder/encoder.nope": torch.zeros(1)})


def test_is_personal() -> None:
    reference, model = image_client_model(personal_heads=True)
    assert not any(is_personal(reference, k) for k in reference.part_state())
    personal = {k for k in model.part_state() if is_personal(model, k)}
    assert personal == {k for k in model.part_state() if "lora_" in k or k.startswith("image_head/")}
    _, no_heads = image_client_model(personal_heads=False)
    assert not any(is_personal(no_heads, k) for k in no_heads.part_state() if k.startswith("image_head/"))


@pytest.mark.parametrize("kind", ["cnn", "transformer", "hf"])
def test_saved_adapters_reload_onto_the_base_tower_exactly(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    part, tower, raw = make(kind, request)
    pristine = copy.deepcopy(tower)
    model = add_adapters(MultimodalModel({part: tower}), LoraSettings(rank=2, alpha=4)).eval()
    randomize_adapters(model)
    getattr(model, part).save_pretrained(str(tmp_path / part))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / part).iterdir()
    }
    loaded = AdaptedModel({part: load_adapted_tower(pristine, tmp_path / part)}).eval()
    with torch.no_grad():
        assert torch.equal(encode(model, part, raw), encode(loaded, part, raw))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapted_tower(copy.deepcopy(pristine), tmp_path / "missing")


def test_peft_attention_lora_is_in_proj_plus_twice_the_out_proj_delta() -> None:
    """Pins what a saved attention adapter means with peft 0.21: W_in + dW_in, W_out + 2 dW_out
    (huggingface/peft#3774). If peft changes this, saved adapters change meaning: re-check."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, reference = Attention(), Attention()
    reference.load_state_dict(model.state_dict())
    adapted = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["attn"]))
    randomize_adapters(adapted)
    layer = adapted.base_model.model.attn
    out = layer.base_layer.out_proj
    with torch.no_grad():
        reference.attn.in_proj_weight += layer.get_delta_weight("default")
        reference.attn.out_proj.weight += 2 * out.get_delta_weight("default")
        x = torch.randn(2, 5, 8)
        assert torch.allclose(adapted(x), reference(x), atol=1e-4)
