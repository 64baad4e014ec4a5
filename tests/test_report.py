"""The run plots (mmfed/report.py), checked on the matplotlib objects: labels, lines, marks, units."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from mmfed.report import panel_figure, plot_run, traffic_figure

RECORDS = [
    {
        "round": r,
        "bytes_up": 12_165_720,
        "bytes_down": 12_165_720 + 1000 * r,
        "train/image/loss": 2.0 - 0.1 * r,
        **{f"val/retrieval/{d}/R@{k}": 10.0 * k + r for d in ("i2t", "t2i") for k in (1, 5, 10)},
        "val/retrieval/rsum": 100.0 + r,
        "val/classification/image/acc": 20.0 + r,
    }
    for r in (1, 2, 3)
]
SUMMARY = {
    "best_round": 2,
    "rounds": 3,
    "selection_metric": "retrieval/rsum",
    "test/retrieval/i2t/R@10": 91.5,
    "test/retrieval/rsum": 95.0,
    "chance/retrieval/rsum": 52.1,
    "test/classification/image/acc": 21.0,
    "chance/classification/image/acc": 10.0,
}
# summary.json as written before the test/ prefix: the same plots
OLD_SUMMARY = {k.removeprefix("test/"): v for k, v in SUMMARY.items()}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


@pytest.mark.parametrize("summary", [SUMMARY, OLD_SUMMARY], ids=["test-prefix", "old-format"])
def test_retrieval_shows_validation_recall_at_1_5_10_both_ways_with_the_test_star(summary: dict) -> None:
    fig = panel_figure("retrieval", RECORDS, summary, "runs/x")
    i2t, t2i = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["image to text", "text to image"]
    assert "validation" in fig._suptitle.get_text()
    assert i2t.get_ylabel() == "recall@K (%)" and i2t.get_xlabel() == "round"
    lines = _lines(i2t)
    assert {"val i2t R@1", "val i2t R@5", "val i2t R@10 (test 91.5)"} <= set(lines)
    assert {"val t2i R@1", "val t2i R@5", "val t2i R@10"} <= set(_lines(t2i))
    best = lines["best round 2 (val retrieval/rsum)"]
    assert list(best.get_xdata()) == [2, 2]
    stars = [line for line in i2t.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [2] and list(stars[0].get_ydata()) == [91.5]
    assert "test, model of round 2" in [t.get_text() for t in i2t.get_legend().get_texts()]


@pytest.mark.parametrize("summary", [SUMMARY, OLD_SUMMARY], ids=["test-prefix", "old-format"])
def test_rsum_and_classification_draw_the_chance_level_of_the_test_split(summary: dict) -> None:
    for name, value in (("rsum", 52.1), ("classification", 10.0)):
        ax = panel_figure(name, RECORDS, summary, "runs/x").axes[0]
        assert ax.get_ylabel().endswith("(%)")
        horizontal = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert [list(line.get_ydata()) for line in horizontal] == [[value, value]]
        assert "chance (test split)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_a_run_still_going_has_curves_but_no_test_marks() -> None:
    ax = panel_figure("rsum", RECORDS, {}, "runs/x").axes[0]
    assert set(_lines(ax)) == {"val rsum"}


def test_traffic_is_megabytes_per_round_per_direction_without_an_offset_axis() -> None:
    fig = traffic_figure(RECORDS, "runs/x")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "MB per round (10^6 bytes)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["up: clients to server", "down: server to clients"]
    up, down = (container for container in ax.containers)
    assert [bar.get_height() for bar in up] == pytest.approx([12.16572] * 3)
    assert [bar.get_height() for bar in down] == pytest.approx([12.16672, 12.16772, 12.16872])
    fig.canvas.draw()
    assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "1e7" above the axis
    assert all("e" not in t.get_text() for t in ax.get_yticklabels())


def test_plot_run_writes_every_panel(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == [
        "classification.png",
        "retrieval.png",
        "rsum.png",
        "traffic.png",
        "train_loss.png",
    ]
    assert all(p.stat().st_size > 0 for p in written)


def test_report_on_a_damaged_metrics_file_is_one_line_naming_it(tmp_path, capsys) -> None:
    from mmfed.cli import main

    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "val/retr')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "metrics.jsonl") in err and "line 2" in err, err
