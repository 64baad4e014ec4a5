"""`resume=true` continues the config saved in the run folder; overrides that differ are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmfed.cli import main

pytestmark = pytest.mark.slow


def test_resume_reads_the_saved_config_and_names_overrides_that_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    original = ["experiment=smoke", "quiet=true", "rounds=1", "partition.alpha=0.9", f"run_dir={run}"]
    assert main(["train", *original]) == 0
    capsys.readouterr()

    # only the folder, resume and a new round count: the saved config (alpha 0.9, the smoke sizes) goes on
    assert main(["train", f"run_dir={run}", "resume=true", "rounds=2", "quiet=true"]) == 0
    assert "2 rounds done" in capsys.readouterr().out
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.partition.alpha == 0.9 and saved.model.embed_dim == 16 and saved.rounds == 2
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]

    # repeating the original overrides is fine: they ask for what is saved
    assert main(["train", *original[:-2], "rounds=3", f"run_dir={run}", "resume=true"]) == 0
    capsys.readouterr()

    # no rounds= keeps the saved 3 (not the default 12); fewer rounds than done is an error
    assert main(["train", f"run_dir={run}", "resume=true", "quiet=true"]) == 0
    assert "3 rounds done" in capsys.readouterr().out
    assert main(["train", f"run_dir={run}", "resume=true", "rounds=2"]) == 2
    assert "rounds=2 is fewer than the 3 rounds" in capsys.readouterr().err

    # asking for something else is an error naming the key and both values, even the default value
    for override, named in (
        ("partition.alpha=0.5", "partition.alpha=0.5 (saved: 0.9)"),
        ("algorithm=fedprox", "algorithm.loss_terms.prox={...} (saved: (absent))"),
        ("experiment=compare", "data.n_public=600 (saved: 16)"),
    ):
        assert main(["train", f"run_dir={run}", "resume=true", "rounds=3", override]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmfed: error: resume=true continues the config saved in") and "\n" not in err
        assert named in err, err


def test_a_copied_run_folder_resumes_in_the_copy_not_where_it_was_made(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    original = tmp_path / "original"
    assert main(["train", "experiment=smoke", "quiet=true", "rounds=1", f"run_dir={original}"]) == 0
    before = (original / "metrics.jsonl").read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    capsys.readouterr()
    assert main(["train", f"run_dir={copy}", "resume=true", "rounds=2", "quiet=true"]) == 0
    assert str(copy) in capsys.readouterr().out
    assert (original / "metrics.jsonl").read_bytes() == before  # the original folder is untouched
    rounds = [json.loads(line)["round"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    assert OmegaConf.load(copy / "config.yaml").run_dir == str(copy)
