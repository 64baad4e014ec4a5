"""`mmfed personalize`: per-client LoRA adapters + head on a finished run, saved and reloadable exactly.

The run folder is made directly (config.yaml + a global checkpoint), not trained: personalization
only reads those two files, and the tests check mechanics, not accuracy (eval/personalize_lora.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mmfed.cli import compose, main
from mmfed.config import ConfigError
from mmfed.federation.run import Federation
from mmfed.personalize import Personalizer, load_personalized, personalize_run, settings_from
from mmfed.utils.io import save_torch


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("personalize") / "run"
    cfg = compose(["experiment=smoke", "quiet=true", "name=run", f"run_dir={root}"])
    root.mkdir()
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    save_torch(Federation(cfg).global_model().state_dict(), root / "checkpoints" / "best.pt")
    return root


def test_settings_overrides_and_errors() -> None:
    settings, cfg = settings_from(["epochs=2", "rank=4", "lr=0.01", "clients=[image-0]"])
    assert settings.training.local_epochs == 2 and settings.training.lr == 0.01
    assert settings.lora.rank == 4 and settings.clients == ["image-0"] and cfg["rank"] == 4
    with pytest.raises(ConfigError, match=r"'personalize\.rnk'"):
        settings_from(["rnk=4"])
    with pytest.raises(ConfigError, match=r"'personalize\.epochs'"):
        settings_from(["epochs=many"])
    with pytest.raises(ConfigError, match="rank must be > 0"):
        settings_from(["rank=0"])
    with pytest.raises(ConfigError, match="not key=value"):
        settings_from(["rank"])


def test_personalize_run_writes_summary_adapters_sizes_and_plot(run_dir: Path) -> None:
    summary = personalize_run(run_dir, ["epochs=1"])
    out = run_dir / "personalized"
    assert json.loads((out / "summary.json").read_text())["clients"].keys() == {
        "image-0",
        "text-0",
        "paired-0",
    }
    assert (out / "clients.png").stat().st_size > 0
    global_model = Federation(OmegaConf.load(run_dir / "config.yaml")).global_model()
    for cid, row in summary["clients"].items():
        folder = out / cid
        parts = {
            "image": ["image_encoder"],
            "text": ["text_encoder"],
            "paired": ["image_encoder", "text_encoder"],
        }
        assert row["parts"] == parts[row["kind"]]
        params = 0
        for part in row["parts"]:
            assert json.loads((folder / part / "adapter_config.json").read_text())["peft_type"] == "LORA"
            tensors = load_file(str(folder / part / "adapter_model.safetensors"))
            assert tensors and all("lora_" in k for k in tensors)
            params += sum(t.numel() for t in tensors.values())
        encoder = sum(p.numel() for part in row["parts"] for p in getattr(global_model, part).parameters())
        assert row["adapter_params"] == params and row["encoder_params"] == encoder
        assert row["adapter_fraction"] == pytest.approx(params / encoder)
        assert row["adapter_bytes"] == 4 * params  # float32
        assert row["adapter_file_bytes"] > row["adapter_bytes"]  # + safetensors header
        assert 0.0 <= row["global"] <= 100.0 and 0.0 <= row["personalized"] <= 100.0
        assert row["train"]["train/steps"] > 0
    paired = summary["clients"]["paired-0"]
    r1 = [paired["personalized_metrics"][f"retrieval/{d}/R@1"] for d in ("i2t", "t2i")]
    assert paired["personalized"] == pytest.approx(sum(r1) / 2)
    image = [r for r in summary["clients"].values() if r["kind"] == "image"]
    assert summary["image/personalized/mean"] == pytest.approx(image[0]["personalized"])
    assert summary["image/personalized/std"] == 0.0


@pytest.mark.parametrize("cid", ["image-0", "paired-0"])
def test_saved_adapters_on_the_global_model_reproduce_the_personalized_predictions(
    run_dir: Path, tmp_path: Path, cid: str
) -> None:
    settings, _ = settings_from(["epochs=1", "lr=0.01"])
    personalizer, federation = Personalizer.from_run(run_dir, settings)
    app = federation.client_app(cid)
    row, trained = personalizer.client(app.spec, app.data, app.test_data, tmp_path / cid)
    loaded = load_personalized(personalizer.global_model, tmp_path / cid)
    test = app.test_data
    trained.eval()
    with torch.no_grad():
        if trained.has("image_encoder"):
            assert torch.equal(trained.encode_images(test.images), loaded.encode_images(test.images))
        if trained.has("image_head"):
            emb = trained.encode_images(test.images)
            assert torch.equal(trained.image_head(emb), loaded.image_head(emb))
        if trained.has("text_encoder"):
            texts = [c[0] for c in test.captions]
            assert torch.equal(trained.encode_texts(texts), loaded.encode_texts(texts))
    assert personalizer.evaluator.evaluate(loaded, test) == row["personalized_metrics"]
    # base weights are the global model's; adapters (and the head) are what changed
    global_state = personalizer.global_model.part_state()
    state = loaded.part_state()
    for key, value in state.items():
        if "lora_" not in key and not key.startswith(("image_head/", "text_head/")):
            assert torch.equal(value, global_state[key]), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    if loaded.has("image_head"):
        assert not torch.equal(state["image_head/weight"], global_state["image_head/weight"])


def test_cli_personalize_and_its_errors(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["personalize", str(run_dir), "epochs=1", "clients=[text-0]"]) == 0
    out = capsys.readouterr().out
    assert "text-0" in out and "image-0" not in out and "personalized" in out
    cases = [
        ([str(run_dir), "rnk=2"], "personalize.rnk"),
        ([str(run_dir), "clients=[nobody]"], "personalize.clients"),
        ([str(run_dir), "checkpoint=last"], "last.pt"),
        ([str(run_dir.parent / "missing")], "config.yaml"),
        ([str(run_dir), "text_target_modules=[nope]"], "text_target_modules"),
    ]
    for args, needle in cases:
        assert main(["personalize", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
