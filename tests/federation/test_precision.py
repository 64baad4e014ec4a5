"""`training.precision=bfloat16` (autocast of the encoders' training forward) and the CNN's
`channels_last` option: faster on CPUs with native bfloat16, same results up to rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmfed  # noqa: F401  (the torchvision guard)
from mmfed.algorithms.base import LossTerm
from mmfed.cli import compose
from mmfed.config import ConfigError
from mmfed.federation.client import LocalTraining
from mmfed.federation.launch import train
from mmfed.models.encoders import SmallCNN
from mmfed.models.multimodal import MultimodalModel

TINY = ["experiment=smoke", "quiet=true", "rounds=1"]


def test_float32_autocast_is_a_no_op_and_bfloat16_runs_convolutions_in_bfloat16() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    cpu = torch.device("cpu")
    with LocalTraining().autocast(cpu, "image"):
        assert conv(x).dtype == torch.float32
    with LocalTraining(precision="bfloat16").autocast(cpu, "image"):
        assert conv(x).dtype == torch.bfloat16
    only_images = LocalTraining(precision="bfloat16", precision_modalities=("image",))
    with only_images.autocast(cpu, "text"):
        assert conv(x).dtype == torch.float32
    with only_images.autocast(cpu, "image"):
        assert conv(x).dtype == torch.bfloat16


def test_bfloat16_run_encodes_in_bfloat16_and_hands_float32_to_the_loss_terms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_encoder: list[torch.dtype] = []
    seen_terms: set[torch.dtype] = set()
    encode = MultimodalModel._tower_forward

    def recording_forward(self: MultimodalModel, tower: torch.nn.Module, raw: object) -> torch.Tensor:
        emb = encode(self, tower, raw)
        if self.training:
            seen_encoder.append(emb.dtype)
        return emb

    call = LossTerm.__call__

    def recording_call(self: LossTerm, batch: dict, out: dict, model: MultimodalModel) -> dict:
        seen_terms.update(v.dtype for v in out.values())
        return call(self, batch, out, model)

    monkeypatch.setattr(MultimodalModel, "_tower_forward", recording_forward)
    monkeypatch.setattr(LossTerm, "__call__", recording_call)
    bf16 = train(compose([*TINY, f"run_dir={tmp_path / 'bf16'}", "training.precision=bfloat16"]))
    assert seen_encoder and set(seen_encoder) == {torch.bfloat16}
    assert seen_terms == {torch.float32}
    seen_encoder.clear()
    fp32 = train(compose([*TINY, f"run_dir={tmp_path / 'fp32'}"]))
    assert set(seen_encoder) == {torch.float32}
    losses = []
    for name in ("bf16", "fp32"):
        first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        losses.append([first[f"train/{kind}/loss"] for kind in ("image", "text", "paired")])
    assert bf16 and fp32
    assert losses[0] != losses[1]  # same seed, same data: only the precision differs
    assert losses[0] == pytest.approx(losses[1], rel=0.05)  # ... and only by rounding


def test_precision_modalities_limit_autocast_to_those_encoders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, set[torch.dtype]] = {"image": set(), "text": set()}
    encode = MultimodalModel._encode

    def recording(
        self: MultimodalModel, modality: str, raw: object, normalize: bool, fuse: bool
    ) -> torch.Tensor:
        emb = encode(self, modality, raw, normalize, fuse)
        if self.training:
            seen[modality].add(emb.dtype)
        return emb

    monkeypatch.setattr(MultimodalModel, "_encode", recording)
    overrides = ["training.precision=bfloat16", "training.precision_modalities=[image]"]
    train(compose([*TINY, f"run_dir={tmp_path / 'run'}", *overrides]))
    assert seen == {"image": {torch.bfloat16}, "text": {torch.float32}}


def test_unknown_precision_modality_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"precision_modalities='audio' is not one of 'image', 'text'"):
        compose(["training.precision_modalities=[audio]"])


def test_unknown_precision_is_one_line_naming_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"training.*precision='float16' is not one of 'float32', 'bfloat16'"
    ):
        compose(["training.precision=float16"])


def test_channels_last_cnn_gives_the_same_outputs_and_gradients_up_to_rounding() -> None:
    torch.manual_seed(0)
    plain = SmallCNN(width=8, channels_last=False)
    fast = SmallCNN(width=8)  # channels_last by default
    fast.load_state_dict(plain.state_dict())
    assert fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x_plain, x_fast = plain.prepare(images), fast.prepare(images)
    assert x_fast.is_contiguous(memory_format=torch.channels_last)
    out_plain, out_fast = plain(x_plain), fast(x_fast)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    out_plain.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
    # a state dict sent or saved is plain contiguous memory whatever the layout (payloads copy it)
    from mmfed.protocol import encode_tensors

    sent = encode_tensors({"w": fast.features[0].weight}, "float32")
    assert sent["w"].is_contiguous()


def test_nchw_federation_runs(tmp_path: Path) -> None:
    nchw = "model.image_encoder.channels_last=false"
    summary = train(compose([*TINY, f"run_dir={tmp_path / 'run'}", nchw]))
    assert summary is not None


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_takes_bfloat16_only_where_it_is_native(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmfed.federation.client as client

    monkeypatch.setattr(client, "native_bfloat16", lambda device: native)
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    with LocalTraining(precision="auto").autocast(torch.device("cpu"), "image"):
        assert conv(x).dtype == (torch.bfloat16 if native else torch.float32)


def test_bfloat16_on_the_cpu_runs_attention_on_the_math_backend() -> None:
    """torch 2.13's CPU flash-attention backward is ~17x slower in bfloat16 than in float32; the
    math backend is the faster one there (README, "Performance")."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    everything = _cur_sdpa_kernel_backends()
    assert SDPBackend.FLASH_ATTENTION in everything
    with LocalTraining(precision="bfloat16").autocast(torch.device("cpu"), "text"):
        assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
    with LocalTraining().autocast(torch.device("cpu"), "text"):  # float32: torch's own choice
        assert _cur_sdpa_kernel_backends() == everything
    assert _cur_sdpa_kernel_backends() == everything


def test_default_federation_trains_images_in_auto_precision_and_presets_in_float32() -> None:
    default = compose([])
    assert default.training.precision == "auto"
    assert list(default.training.precision_modalities) == ["image", "text"]
    for preset in ("smoke", "testbed", "compare"):
        assert compose([f"experiment={preset}"]).training.precision == "float32", preset
    assert compose(["~experiment"]).training.precision == "float32"  # the default federation in float32



def test_autocast_context_is_re_enterable_and_inert_until_entered() -> None:
    """The trainer builds one context per modality a step and enters it once per encoder call
    (batch, extra rows, public rows); a modality without input never enters it."""
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    context = LocalTraining(precision="bfloat16").autocast(torch.device("cpu"), "image")
    assert conv(x).dtype == torch.float32  # built, not entered: nothing changed
    for _ in range(2):
        with context:
            assert conv(x).dtype == torch.bfloat16
        assert conv(x).dtype == torch.float32
