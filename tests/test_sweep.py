"""`mmfed train -m`: every combination in its own folder; one failing combination stops nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfed.cli import main
from mmfed.sweep import expand, folder_name


def test_expand_is_the_cartesian_product_in_command_line_order() -> None:
    fixed, combos, swept = expand(["seed=0,1", "rounds=1", "algorithm=fedavg,fedprox"])
    assert fixed == ["rounds=1"]
    assert swept == [
        ["seed=0", "algorithm=fedavg"],
        ["seed=0", "algorithm=fedprox"],
        ["seed=1", "algorithm=fedavg"],
        ["seed=1", "algorithm=fedprox"],
    ]
    assert combos[1] == ["seed=0", "rounds=1", "algorithm=fedprox"]
    assert folder_name(3, ["seed=1", "model/text_encoder=hf"]) == "03_seed=1,model.text_encoder=hf"


def test_run_dir_cannot_be_swept(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "-m", "seed=0,1", "run_dir=x"]) == 2
    assert "config key 'run_dir' cannot be set in a sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_runs_every_combination_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    code = main(
        ["train", "-m", "seed=0,1", "algorithm=fedavg,nonexistent", "clients_per_round=null,99",
         "experiment=smoke", "rounds=1", "quiet=true", f"sweep_dir={sweep}"]
    )  # fmt: skip
    assert code == 1  # some runs failed
    record = json.loads((sweep / "sweep.json").read_text())
    runs = record["runs"]
    assert len(runs) == 8
    ok = [r for r in runs if r["status"] == "ok"]
    assert [r["overrides"] for r in ok] == [
        ["seed=0", "algorithm=fedavg", "clients_per_round=null"],
        ["seed=1", "algorithm=fedavg", "clients_per_round=null"],
    ]
    for entry in ok:
        assert (Path(entry["run_dir"]) / "summary.json").exists()
        assert entry["selection_metric"] == "retrieval/rsum" and isinstance(entry["test"], float)
    composed_badly = [r for r in runs if "nonexistent" in " ".join(r["overrides"])]
    assert all("Could not find 'algorithm/nonexistent'" in r["error"] for r in composed_badly)
    trained_badly = [r for r in runs if r["status"] == "failed" and r not in composed_badly]
    assert len(trained_badly) == 2 and all("clients_per_round=99" in r["error"] for r in trained_badly)
    assert all((Path(r["run_dir"]) / "error.txt").exists() for r in runs if r["status"] == "failed")
    assert Path(ok[0]["run_dir"]).name == "00_seed=0,algorithm=fedavg,clients_per_round=null"
    group = record["compare"]["groups"]
    assert len(group) == 1 and group[0]["seeds"] == [0, 1]  # same settings, two seeds: one group
    printed = capsys.readouterr().out
    assert "| 2 | seed=0 algorithm=nonexistent clients_per_round=null | failed:" in printed
    assert "| (all runs) | 2 |" in printed
    assert "2 of 8 runs finished" in printed
