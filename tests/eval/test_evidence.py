"""The evidence table's arithmetic (eval/evidence.py): verdicts, the local-only row (its paired intervals:
mmfed.compare.paired_difference, tests/test_compare.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "eval"))
import evidence  # noqa: E402


def test_verdicts_follow_the_interval() -> None:
    assert evidence.verdict((3.0, 1.0, 5.0, 3)) == "reproduced"
    assert evidence.verdict((-3.0, -5.0, -1.0, 3)) == "contradicted"
    assert evidence.verdict((1.0, -1.0, 3.0, 3)) == "not reproduced (same direction, interval includes 0)"
    assert evidence.verdict((-1.0, -3.0, 1.0, 3)) == "not reproduced (interval includes 0)"
    assert evidence.verdict(None) == "not measured"


def test_local_only_row_takes_each_metric_from_the_clients_that_train_it() -> None:
    per_client = {
        "image-0": {"test/classification/image/acc": 40.0, "classification/text/acc": 90.0,
                    "local/image/classification/image/acc/mean": 80.0},
        "image-1": {"classification/image/acc": 60.0, "local/image/classification/image/acc/mean": 70.0},
        "text-0": {"classification/text/acc": 50.0, "classification/image/acc": 99.0},
        "paired-0": {"retrieval/rsum": 120.0, "retrieval/i2t/R@1": 5.0, "classification/image/acc": 99.0,
                     "local/paired/retrieval/rsum/mean": 300.0},
    }  # fmt: skip
    row = evidence.local_only_summary(per_client)
    assert (
        row["classification/image/acc"] == 50.0
    )  # image clients only (the paired client's head is untrained)
    assert row["classification/text/acc"] == 50.0  # text clients only
    assert row["retrieval/rsum"] == 120.0 and row["retrieval/i2t/R@1"] == 5.0
    assert row["local/image/classification/image/acc/mean"] == 75.0
    assert row["local/paired/retrieval/rsum/mean"] == 300.0
    assert "local/text/classification/text/acc/mean" not in row


def test_every_claim_names_measured_methods_and_settings() -> None:
    for claim, setting, method, baseline, key, _ in evidence.CLAIMS:
        for name in (method, baseline):
            assert setting in evidence.BY_NAME[name].settings, (claim, name, setting)
        assert key in evidence.COLUMNS.values(), claim


def test_jobs_run_baselines_first_then_one_claim_at_a_time() -> None:
    jobs = evidence.job_order(evidence.METHODS, list(evidence.SETTINGS), [0, 1, 2])
    names = [j[0] for j in jobs]
    assert len(jobs) == len(set(jobs))  # nothing twice
    last_core = max(
        i for i, j in enumerate(jobs) if evidence.BY_NAME[j[0]].group == "core" and j[1] != "domain"
    )
    assert all(evidence.BY_NAME[n].group == "core" for n in names[: last_core + 1])
    first_a01 = [j for j in jobs if j[1] == "a0.1" and evidence.BY_NAME[j[0]].group != "core"]
    assert [j[0] for j in first_a01[:3]] == ["feddifrc"] * 3 and first_a01[3][
        0
    ] == "creamfl"  # all seeds of one
    assert sum(1 for j in jobs if j[0] == "local-only") == 3 * 3 * 9  # a0.1, a0.5, domain: nine clients each
    assert all(setting in evidence.BY_NAME[name].settings for name, setting, _, _ in jobs)


def test_a_subset_invocation_keeps_every_finished_row_and_seed(tmp_path, monkeypatch, capsys) -> None:
    """--methods / --settings / --seeds choose what to train; the table still shows every finished
    run (before: `--methods local-only --settings domain` rewrote table.md with that one row)."""
    import json

    runs = tmp_path / "runs"
    for name, seed, rsum in (("fedavg", 0, 100.0), ("fedavg", 1, 110.0), ("fedprox", 0, 130.0)):
        folder = runs / "a0.1" / f"{name}-s{seed}"
        folder.mkdir(parents=True)
        summary = {"test/retrieval/rsum": rsum, "test/classification/image/acc": 50.0}
        (folder / "summary.json").write_text(json.dumps(summary))
    (runs / "a0.1" / "moon-s2").mkdir()  # started, not finished: its seed is not in the table
    assert evidence.table_seeds(runs, [0]) == [0, 1]
    argv = ["evidence.py", "--report-only", "--methods", "fedavg", "--settings", "iid", "--seeds", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    evidence.main()
    capsys.readouterr()
    table = (tmp_path / "table.md").read_text()
    assert "seeds [0, 1]" in table
    assert "| fedavg | 2 |" in table and "| fedprox | 1 |" in table  # the setting and method not asked for
