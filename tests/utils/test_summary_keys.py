"""summary.json keys: test metrics under test/, read in either format (old: unprefixed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfed.utils.io import CorruptFileError, read_summary, summary_key, summary_metric, upgrade_summary

OLD = {
    "retrieval/rsum": 120.0,
    "classification/image/acc": 40.0,
    "test/coco-1k/retrieval/rsum": 80.0,
    "chance/retrieval/rsum": 52.1,
    "val/retrieval/rsum": 130.0,
    "local/image/classification/image/acc/mean": 35.0,
    "cost/upload_bytes": 10.0,
    "rounds": 2,
}
NEW = {summary_key(k): v for k, v in OLD.items()}


def test_bare_metrics_are_test_metrics_and_prefixed_keys_stay() -> None:
    assert summary_key("retrieval/rsum") == "test/retrieval/rsum"
    assert summary_key("classification/text/acc") == "test/classification/text/acc"
    for key in ("test/retrieval/rsum", "val/retrieval/rsum", "chance/retrieval/rsum", "rounds",
                "local/image/classification/image/acc/mean", "cost/upload_bytes"):  # fmt: skip
        assert summary_key(key) == key
    assert set(NEW) - set(OLD) == {"test/retrieval/rsum", "test/classification/image/acc"}


@pytest.mark.parametrize("summary", [OLD, NEW], ids=["old", "new"])
def test_either_format_reads_the_same(summary: dict, tmp_path: Path) -> None:
    assert upgrade_summary(summary) == NEW
    for key in ("retrieval/rsum", "test/retrieval/rsum"):
        assert summary_metric(summary, key) == 120.0
    assert summary_metric(summary, "val/retrieval/rsum") == 130.0
    assert summary_metric(summary, "local/image/classification/image/acc/mean") == 35.0
    assert summary_metric(summary, "classification/text/acc") is None
    assert summary_metric(summary, "classification/text/acc", float("nan")) != 0.0
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert read_summary(tmp_path / "summary.json") == NEW


def test_a_summary_that_is_not_an_object_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match=f"run summary {path} is not a JSON object"):
        read_summary(path)


def test_the_eval_scripts_read_both_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    """eval/runs.py `values` (what the comparison scripts tabulate) over old and new summaries, and
    every column the scripts name is a current key (a bare key would hide a reader indexing by it)."""
    import importlib

    eval_dir = Path(__file__).resolve().parents[2] / "eval"
    monkeypatch.syspath_prepend(str(eval_dir))
    runs = importlib.import_module("runs")
    assert runs.values([OLD, NEW, {"rounds": 1}], "test/retrieval/rsum") == [120.0, 120.0]
    assert runs.values([OLD, NEW], "retrieval/rsum") == [120.0, 120.0]
    for script in ("compare_methods", "compare_guided", "compare_fedddpm"):
        columns = importlib.import_module(script).COLUMNS
        keys = [key if isinstance(key, str) else key[0] for key in columns.values()]
        assert all(summary_key(key) == key for key in keys), (script, keys)
