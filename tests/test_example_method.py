"""examples/my_method: a loss term and a server step in the user's own module, chosen from the command
line by registered name (MMFED_PLUGINS) or by _target_, without editing mmfed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_method"


@pytest.fixture
def my_method(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import my_method

    return my_method


def test_clipped_step_by_hand(my_method) -> None:
    step = my_method.ClippedFedAvg(eta=0.5, max_norm=1.0)
    x = torch.tensor([1.0, 1.0])
    # ||Delta|| = 5 > 1: Delta scaled to norm 1 -> [0.6, 0.8], times eta 0.5
    assert torch.allclose(step.update("p", x, torch.tensor([3.0, 4.0])), torch.tensor([1.3, 1.4]))
    # ||Delta|| = 0.5 <= 1: unclipped
    assert torch.allclose(step.update("p", x, torch.tensor([0.3, 0.4])), torch.tensor([1.15, 1.2]))


def test_feature_pull_by_hand(my_method) -> None:
    class Global:
        def encode_images(self, images: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(images), 2)

        def encode_texts(self, texts: list[str]) -> torch.Tensor:
            return torch.ones(len(texts), 2)

    term = my_method.FeaturePull(mu=0.2)
    term._global = Global()
    out = {
        "image_emb": torch.tensor([[1.0, 2.0], [0.0, 0.0]]),
        "text_emb": torch.tensor([[1.0, 3.0], [1.0, 1.0]]),
    }
    batch = {"images": torch.zeros(2, 3, 4, 4), "captions": ["a", "b"]}
    # images: mean(||[1,2]||^2, 0) = 2.5; texts: mean(||[0,2]||^2, 0) = 2; mu/2 * (2.5 + 2) = 0.45
    assert float(term(batch, out, None)["feature_pull"]) == pytest.approx(0.45)


def _train(run_dir: Path, *overrides: str) -> list[dict]:
    from mmfed.cli import main

    code = main(["train", "experiment=smoke", "rounds=1", "quiet=true", f"run_dir={run_dir}", *overrides])
    assert code == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_selected_by_registered_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, my_method) -> None:
    monkeypatch.setenv("MMFED_PLUGINS", "my_method")
    (record,) = _train(
        tmp_path / "run",
        "+loss_term@algorithm.loss_terms.feature_pull=feature_pull",
        "~server_step@algorithm.server_steps.fedavg",
        "+server_step@algorithm.server_steps.clipped=clipped_fedavg",
        "algorithm.server_steps.clipped.max_norm=0.5",
    )
    assert record["train/feature_pull"] >= 0 and record["server/clipped/pseudo_gradient_norm"] > 0


@pytest.mark.slow
def test_selected_by_target_from_the_users_config_folder(tmp_path: Path, my_method) -> None:
    (record,) = _train(
        tmp_path / "run", f"hydra.searchpath=[file://{EXAMPLE / 'configs'}]", "algorithm=my_method"
    )
    assert "train/feature_pull" in record and "server/clipped/image_encoder/clients" in record


def test_a_plugin_that_does_not_import_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mmfed.cli import main

    monkeypatch.setenv("MMFED_PLUGINS", "no_such_module_here")
    assert main(["config"]) == 2
    assert "MMFED_PLUGINS: cannot import 'no_such_module_here'" in capsys.readouterr().err
