"""Errors for missing data: one line at once without network, and every command they advise runs
(the advised options are accepted: it fails again only because the placeholder folder is empty)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from omegaconf import OmegaConf

from mmfed.cli import compose, main
from mmfed.data.sources import base


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[bool]:
    """The hub is unreachable (whatever this machine's network), offline flags unset; records, for
    each `datasets.load_dataset` call, whether it ran in offline mode (no retries, no waiting)."""
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(base, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("MMFED_DATA_DIR", str(tmp_path / "data"))
    calls: list[bool] = []

    def load_dataset(target: str, *args, **kwargs):
        calls.append(bool(huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't reach '{target}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def _error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfed: error: ") and "\n" not in err, err
    return err


def _run_folder(tmp_path: Path) -> Path:
    """Enough of a run folder for `mmfed eval` to reach the data: its config and a checkpoint file."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    cfg = compose(["experiment=smoke", f"run_dir={run}"])
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run


def _placeholders(text: str, tmp_path: Path) -> str:
    return text.replace("FOLDER", str(tmp_path / "elsewhere")).replace("OWNER/NAME", "someone/elsewhere")


def test_eval_without_data_or_network_is_one_line_whose_commands_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_network: list[bool]
) -> None:
    run = _run_folder(tmp_path)
    assert main(["eval", str(run), "protocol=coco-1k"]) == 2
    err = _error(capsys)
    assert no_network == [True]  # the hub was never contacted: only the local HF cache was asked
    assert "no connection to huggingface.co" in err and "root=..." not in err
    advised = re.search(r"Then run: (mmfed eval \S+ protocol=coco-1k) (\S+) \(or (.*?)\);", err)
    assert advised, err
    command, first, others = advised.groups()
    options = [first, *others.split(" / ")]
    assert options == ["data.root=FOLDER", "data.image_root=FOLDER", "data.hub_id=OWNER/NAME"]
    for option in options:
        argv = shlex.split(_placeholders(f"{command} {option}", tmp_path))[1:]
        assert main(argv) == 2
        again = _error(capsys)
        assert "unknown option" not in again and "dataset 'coco' not found" in again, again
        if "image_root" not in option:  # the new place is among those tried
            assert str(tmp_path / "elsewhere") in again or "someone/elsewhere" in again, again


def test_train_advice_names_the_config_key_of_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_network: list[bool]
) -> None:
    """`data=cifar10` advises data.root; a composite's member advises its own key (data.image.root)."""
    for preset, key in (("data=cifar10", "data.root"), ("experiment=creamfl_real", "data.image.root")):
        command = ["train", preset, "quiet=true", f"run_dir={tmp_path / preset.split('=')[1]}"]
        assert main(command) == 2
        err = _error(capsys)
        assert f"Or pass {key}=FOLDER or {key.replace('root', 'hub_id')}=OWNER/NAME" in err, err
        for i, option in enumerate((f"{key}=FOLDER", f"{key.replace('root', 'hub_id')}=OWNER/NAME")):
            retry = [*command[:-1], f"run_dir={tmp_path / f'retry{i}'}", _placeholders(option, tmp_path)]
            assert main(retry) == 2
            again = _error(capsys)
            assert "not found" in again and ("elsewhere" in again), again
    assert all(no_network)


def test_hub_reachable_is_a_quick_connection_check(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    base.hub_reachable.cache_clear()
    try:
        assert base.hub_reachable(timeout=1.0) is False
        base.hub_reachable.cache_clear()
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a proxy: the library knows the way
        assert base.hub_reachable(timeout=1.0) is True
    finally:
        base.hub_reachable.cache_clear()
