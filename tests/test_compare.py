"""`mmfed compare`: grouping by differing config keys, mean ± std over seeds, curves, on synthetic runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mmfed.cli import main
from mmfed.compare import compare, compare_runs, differing_keys, format_table, paired_difference

# (algorithm's loss terms, seed, final retrieval/rsum, per-round val/retrieval/rsum)
RUNS = [
    ({"image_ce": {"weight": 1.0}}, 0, 10.0, [4.0, 10.0]),
    ({"image_ce": {"weight": 1.0}}, 1, 14.0, [6.0, 14.0]),
    ({"image_ce": {"weight": 1.0}, "prox": {"mu": 0.01}}, 0, 20.0, [8.0, 20.0]),
    ({"image_ce": {"weight": 1.0}, "prox": {"mu": 0.01}}, 1, 22.0, [12.0, 22.0]),
]


def _run(folder: Path, terms: dict, seed: int, final: float, curve: list[float], done: bool = True) -> Path:
    folder.mkdir(parents=True)
    algorithm = {"loss_terms": terms, "server_steps": {"fedavg": {"transport_dtype": "float32"}}}
    config = {"seed": seed, "name": folder.name, "run_dir": str(folder), "rounds": 2, "algorithm": algorithm}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"round": r, "val/retrieval/rsum": v, "train/loss": 1 / r} for r, v in enumerate(curve, 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if done:  # seed 0: summary.json as written now; seed 1: as before the test/ prefix
        prefix = "test/" if seed == 0 else ""
        summary = {f"{prefix}retrieval/rsum": final, f"{prefix}classification/image/acc": 50.0 + seed,
                   "rounds": 2, "selection_metric": "retrieval/rsum",
                   "clients": {"image-0": {"acc": 1.0}}}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for i, (terms, seed, final, curve) in enumerate(RUNS):
        _run(tmp_path / "sweep" / f"{i}", terms, seed, final, curve)
    _run(tmp_path / "sweep" / "9", RUNS[0][0], 2, 0.0, [1.0], done=False)  # crashed: no summary
    return tmp_path / "sweep"


def test_differing_keys_collapse_to_the_node_every_run_has(sweep: Path) -> None:
    from mmfed.compare import find_runs, load_config

    configs = [load_config(run) for run in find_runs([sweep])]
    assert differing_keys(configs) == ["algorithm.loss_terms"]  # not seed, name, run_dir; prox.mu collapsed


def test_groups_mean_and_std_over_seeds(sweep: Path) -> None:
    result = compare_runs([sweep])
    rows = {row["group"]: row for row in result["groups"]}
    assert set(rows) == {"algorithm.loss_terms=image_ce", "algorithm.loss_terms=image_ce,prox"}
    assert result["metrics"] == ["test/retrieval/rsum", "test/classification/image/acc"]  # both formats
    fedavg = rows["algorithm.loss_terms=image_ce"]["metrics"]["test/retrieval/rsum"]
    assert fedavg["mean"] == 12.0 and fedavg["n"] == 2
    assert fedavg["std"] == pytest.approx(math.sqrt(((10 - 12) ** 2 + (14 - 12) ** 2) / 1))  # ddof 1: 2.83
    prox = rows["algorithm.loss_terms=image_ce,prox"]["metrics"]["test/classification/image/acc"]
    assert prox["mean"] == 50.5 and prox["std"] == pytest.approx(math.sqrt(0.5))
    assert rows["algorithm.loss_terms=image_ce"]["seeds"] == [0, 1]
    assert result["unfinished"] == [str(sweep / "9")]
    table = format_table(result)
    assert "| algorithm.loss_terms=image_ce | 2 | 12.00 ± 2.83 |" in table
    assert "not finished (no summary.json)" in table


def test_curves_and_files(sweep: Path, tmp_path: Path) -> None:
    result, out = compare([sweep])
    assert out == sweep / "compare"
    assert {Path(p).name for p in result["plots"]} == {"val_retrieval_rsum.png", "train_loss.png"}
    assert all(Path(p).stat().st_size > 0 for p in result["plots"])
    assert json.loads((out / "compare.json").read_text())["keys"] == ["algorithm.loss_terms"]


def test_cli_compare_and_bad_folder(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for metrics in ("retrieval/*", "test/retrieval/*"):  # a bare metric means its test/ key
        assert main(["compare", str(sweep / "0"), str(sweep / "2"), "--out", str(tmp_path / "c"),
                     "--metrics", metrics]) == 0  # fmt: skip
        printed = capsys.readouterr().out
        assert "| group | runs | test/retrieval/rsum |" in printed
        assert "| algorithm.loss_terms=image_ce,prox | 1 | 20.00 ± 0.00 |" in printed
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "is neither a run folder" in capsys.readouterr().err


def test_paired_differences_to_a_baseline_pair_runs_by_seed(sweep: Path, tmp_path: Path) -> None:
    # a prox run of seed 5 has no FedAvg partner: left out of the pairs, kept in the mean ± std
    _run(sweep / "7", RUNS[2][0], 5, 100.0, [1.0, 100.0])
    result = compare_runs([sweep], baseline="loss_terms=image_ce,prox")
    assert result["baseline"] == "algorithm.loss_terms=image_ce,prox"
    fedavg = {row["group"]: row for row in result["groups"]}["algorithm.loss_terms=image_ce"]
    rsum = fedavg["paired_to_baseline"]["test/retrieval/rsum"]
    # per-seed differences 10 - 20 = -10 and 14 - 22 = -8: mean -9, sd sqrt(2), half 12.706 * sqrt(2)/sqrt(2)
    assert rsum["n"] == 2 and rsum["mean"] == pytest.approx(-9.0)
    assert (rsum["low"], rsum["high"]) == pytest.approx((-9.0 - 12.706, -9.0 + 12.706))
    acc = fedavg["paired_to_baseline"]["test/classification/image/acc"]  # 50 - 50, 51 - 51
    assert (acc["mean"], acc["low"], acc["high"]) == (0.0, 0.0, 0.0)
    assert "-9.00 [-21.71, +3.71] (2)" in format_table(result)


def test_a_baseline_matching_no_group_or_several_is_one_line(sweep: Path) -> None:
    with pytest.raises(ValueError, match=r"--baseline 'fedyogi' must match exactly one group, matched none"):
        compare_runs([sweep], baseline="fedyogi")
    with pytest.raises(ValueError, match=r"matched 2: algorithm.loss_terms=image_ce; "):
        compare_runs([sweep], baseline="image_ce")


def test_t_quantiles() -> None:
    from mmfed.compare import t975

    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(22) == 2.086 and t975(31) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_paired_difference_is_per_seed_with_a_t_interval() -> None:
    # differences 2, 4, 6: mean 4, sd 2, half width t(0.975, 2) * 2 / sqrt(3) = 4.303 * 1.1547 = 4.969
    mean, lo, hi, n = paired_difference([12.0, 14.0, 16.0], [10.0, 10.0, 10.0])
    assert (mean, n) == (4.0, 3)
    assert lo == pytest.approx(4.0 - 4.9687, abs=1e-3) and hi == pytest.approx(4.0 + 4.9687, abs=1e-3)
    # seed-to-seed noise shared by both methods cancels: per-seed differences 2, 4, 6 again
    with_noise = paired_difference([11.0, 15.0, 16.0], [9.0, 11.0, 10.0])
    assert with_noise[1] == pytest.approx(lo)
    assert paired_difference([1.0, None, 3.0], [0.0, 0.0, None]) is None  # one usable seed: no interval
