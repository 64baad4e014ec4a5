"""What the `mmfed` command imports and prints: a FedAvg run loads no diffusion/LoRA/CLIP/Flower
library, `mmfed config` loads no metric or model library, a run's output in a log is short."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmfed.console import bar_disabled, format_summary, stage_label
from mmfed.metrics.chance import chance_levels, i2t_recall_chance, t2i_recall_chance

REPO = Path(__file__).resolve().parent.parent
# torchmetrics: its import pulls torchvision and transformers (seconds); evaluation is plain torch
NEVER_FOR_FEDAVG = ("diffusers", "peft", "open_clip", "flwr", "ray", "torchmetrics")
# `mmfed config` and its errors compose only: no metric, model-zoo or plotting library either
NEVER_FOR_CONFIG = (
    *NEVER_FOR_FEDAVG,
    "transformers",
    "torchvision",
    "matplotlib",
    "datasets",
)


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, stdout and stderr captured (so neither is a terminal)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _loaded(stdout: str) -> list[str]:
    return json.loads(stdout.strip().splitlines()[-1])


def test_config_of_every_algorithm_and_a_config_error_import_no_heavy_library() -> None:
    algorithms = sorted(p.stem for p in (REPO / "configs" / "algorithm").glob("*.yaml"))
    result = _python(
        f"""
        import json, sys
        from mmfed.cli import main
        for name in {algorithms!r}:
            assert main(["config", "algorithm=" + name]) == 0, name
        assert main(["config", "partition.alpah=1"]) == 2
        print(json.dumps([m for m in {NEVER_FOR_CONFIG!r} if m in sys.modules]))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert _loaded(result.stdout) == []
    assert result.stderr.strip().splitlines()[-1].startswith("mmfed: error: config key 'partition.alpah'")


@pytest.mark.slow
def test_a_fedavg_run_imports_no_heavy_library_and_prints_a_short_table(tmp_path: Path) -> None:
    """A tiny FedAvg federation, as `mmfed train` run into a log: one line per round, then the table.

    The same process first checks the config (the start-up path, `mmfed config`): nothing of
    NEVER_FOR_CONFIG is loaded by then, and nothing of NEVER_FOR_FEDAVG (torchmetrics included) by
    the end of both runs.
    """
    quiet, verbose = tmp_path / "quiet", tmp_path / "verbose"
    result = _python(
        f"""
        import contextlib, io, json, sys
        from mmfed.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["config", "experiment=smoke", "quiet=true", "run_dir={quiet}"]) == 0
        at_start = [m for m in {NEVER_FOR_CONFIG!r} if m in sys.modules]
        assert not at_start, f"mmfed config imported {{at_start}}"
        assert main(["train", "experiment=smoke", "quiet=true", "run_dir={quiet}"]) == 0
        print("=== verbose", file=sys.stderr, flush=True)
        print("=== verbose", flush=True)
        assert main(["train", "experiment=smoke", "rounds=3", "run_dir={verbose}"]) == 0
        print(json.dumps([m for m in {NEVER_FOR_FEDAVG!r} if m in sys.modules]))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _loaded(result.stdout) == []
    out_quiet, out_verbose = result.stdout.rsplit("\n", 2)[0].split("=== verbose\n")  # less the module list
    err_quiet, err_verbose = result.stderr.split("=== verbose\n")
    for out in (out_quiet, out_verbose):
        assert "{" not in out  # no JSON dump
        assert "test split, the global model of round" in out
        assert "retrieval/rsum" in out and "chance" in out
        assert "plots:" in out and "run folder:" in out
    assert len(out_quiet.splitlines()) <= 25
    assert err_quiet.strip() == ""  # quiet: no bars, no per-round lines
    rounds = [line for line in err_verbose.splitlines() if "round " in line]
    assert len(rounds) == 3 and "round 3/3  val retrieval/rsum=" in rounds[-1]
    assert len(err_verbose.splitlines()) == 3, err_verbose  # no progress bar refreshes in a log
    assert "%|" not in err_verbose and "\r" not in err_verbose
    summary = json.loads((verbose / "summary.json").read_text())
    assert f"the global model of round {summary['best_round']} of 3" in out_verbose


def test_chance_of_a_random_ranking_by_hand() -> None:
    # 60 images x 5 captions: an image's R@1 hits iff the top caption is one of its 5 of 300
    assert i2t_recall_chance([5] * 60, 1) == pytest.approx(100 * 5 / 300)
    # captions [2, 1], K=2: image 0 always hits (only 1 negative); image 1 misses with 2/3 * 1/2
    assert i2t_recall_chance([2, 1], 2) == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert t2i_recall_chance(60, 10) == pytest.approx(100 / 6)
    assert t2i_recall_chance(4, 10) == 100.0
    levels = chance_levels([1, 1, 1, 1], image_classes=10, text_classes=0, ks=(1, 5))
    assert levels["retrieval/i2t/R@1"] == pytest.approx(25.0)
    assert levels["retrieval/i2t/R@5"] == pytest.approx(100.0)
    assert levels["retrieval/rsum"] == pytest.approx(25 + 100 + 25 + 100)
    assert levels["classification/image/acc"] == pytest.approx(10.0)
    assert "classification/text/acc" not in levels


def test_chance_matches_every_ranking_of_a_small_gallery() -> None:
    """Exhaustive: the mean R@K over all orderings of 4 captions (image 0 owns 2 of them)."""
    from itertools import permutations

    owners = [0, 0, 1, 2]  # caption -> image
    for k in (1, 2, 3):
        hits = [
            sum(any(owners[c] == image for c in order[:k]) for image in range(3)) / 3
            for order in permutations(range(4))
        ]
        assert i2t_recall_chance([2, 1, 1], k) == pytest.approx(100 * sum(hits) / len(hits))


def test_the_table_names_the_round_the_metrics_and_where_files_are(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "rsum.png").write_bytes(b"")
    summary = {
        "test/retrieval/i2t/R@1": 59.3999981880188,
        "test/retrieval/rsum": 120.0,
        "chance/retrieval/rsum": 52.14,
        "test/classification/image/acc": 40.0,
        "test/coco-1k/retrieval/rsum": 80.0,  # a named test protocol (composite data)
        "local/image/classification/image/acc/mean": 35.0,
        "local/image/classification/image/acc/std": 1.5,
        "rounds": 12,
        "best_round": 9,
        "selection_metric": "retrieval/rsum",
        "val/retrieval/rsum": 130.0,
        "wall_seconds": 75.0,
        "bytes_up": 2_400_000,
        "bytes_down": 2_400_000,
    }
    text = format_summary(summary, tmp_path, total_seconds=90.0)
    assert "12 rounds done (rounds 1 min 15.0 s; 1 min 30.0 s" in text
    assert "round 9 of 12, best validation retrieval/rsum = 130.00" in text
    assert "59.40" in text and "59.399" not in text
    assert "120.00    52.14" in text
    assert "image   classification/image/acc" in text and "35.00 ± 1.50" in text
    assert "2.4 MB up" in text and str(tmp_path / "plots") in text
    assert "  coco-1k/retrieval/rsum" in text and "80.00" in text
    assert len(text.splitlines()) < 16
    # `mmfed report` on a run written before the test/ prefix: the same table
    bare = ("test/retrieval/", "test/classification/")  # not test/coco-1k/...: that key is unchanged
    old = {(k.removeprefix("test/") if k.startswith(bare) else k): v for k, v in summary.items()}
    assert "classification/image/acc" in old and "test/retrieval/rsum" not in old
    assert format_summary(old, tmp_path, total_seconds=90.0) == text


def test_bars_only_on_a_terminal_and_stage_names() -> None:
    assert bar_disabled(False) is True
    assert bar_disabled(True) is None  # tqdm: a bar only when its stream is a terminal
    assert stage_label("fit", 3) == "round 3 fit"
    assert stage_label("evaluate", 13).startswith("final evaluation")
