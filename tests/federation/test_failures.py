"""A client that raises or is too slow is reported, and the round aggregates what arrived, if enough did.

`Boom` is a test-only loss term (picked by config like any other, so it runs inside Ray actors and
SuperNodes too): it raises for one client in one round and sleeps past `client_timeout` for another.
The same run on the embedded engine and on Flower's simulation reports the same failures and ends
with the same metrics.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mmfed.algorithms.base import Batch, ClientRound, LossTerm, Outputs
from mmfed.cli import compose, main
from mmfed.federation.launch import train
from mmfed.models.multimodal import MultimodalModel
from tests.federation.test_flower_simulation import _close

pytestmark = pytest.mark.slow
SLEEP, TIMEOUT = 21.0, 20.0  # the late client sleeps past client_timeout; the others need ~1 s idle,
# but a loaded CI machine (or a Ray actor building its federation first) can take several times that


class Boom(LossTerm):
    """Raises in `begin` for client `raise_cid` in round `raise_round`; sleeps there for `sleep_cid`."""

    def __init__(
        self,
        raise_cid: str = "",
        raise_round: int = 0,
        sleep_cid: str = "",
        sleep_round: int = 0,
        seconds: float = 0.0,
    ) -> None:
        super().__init__()
        self.raise_at, self.sleep_at, self.seconds = (
            (raise_cid, raise_round),
            (sleep_cid, sleep_round),
            seconds,
        )

    def begin(self, round_: ClientRound) -> None:
        if (round_.cid, round_.round) == self.raise_at:
            raise RuntimeError(f"boom {round_.cid} round {round_.round}")
        if (round_.cid, round_.round) == self.sleep_at:
            time.sleep(self.seconds)

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        return {}


def boom(**where: Any) -> str:
    fields = ",".join(f"{k}:{v}" for k, v in where.items())
    return f"+algorithm.loss_terms.boom={{_target_:{Boom.__module__}.Boom,{fields}}}"


FAILING = [
    "experiment=smoke",
    "quiet=true",
    "flower.num_cpus=1",
    f"client_timeout={TIMEOUT}",
    boom(raise_cid="text-0", raise_round=1, sleep_cid="image-0", sleep_round=2, seconds=SLEEP),
]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("wall_seconds")
    return records


def test_failed_and_late_clients_are_reported_and_rounds_aggregate_the_rest(
    tmp_path: Path, one_thread: None
) -> None:
    overrides = [*FAILING, "min_replies=2"]
    runs = {
        "embedded": train(compose([*overrides, f"run_dir={tmp_path / 'embedded'}"])),
        "flower": train(compose([*overrides, "engine=flower", f"run_dir={tmp_path / 'flower'}"])),
    }
    records = {engine: _records(tmp_path / engine) for engine in runs}
    for engine, (first, second) in records.items():
        (raised,) = first["failures"]
        assert raised["node"] == "embedded" if engine == "embedded" else raised["node"].isdigit()
        assert {k: raised[k] for k in ("round", "stage", "cid", "error")} == {
            "round": 1,
            "stage": "fit",
            "cid": "text-0",
            "error": "RuntimeError: boom text-0 round 1",
        }
        (late,) = second["failures"]
        assert (late["round"], late["stage"], late["cid"]) == (2, "fit", "image-0")
        assert late["error"].startswith("timed out: ") and f"> client_timeout={TIMEOUT:g}s" in late["error"]
        # The round aggregated the two replies it had: no loss from the failed client's kind.
        assert "train/text/loss" not in first and "train/image/loss" in first
        assert "train/image/loss" not in second and "train/text/loss" in second
        assert first["bytes_up"] < first["bytes_down"]  # nothing came back from text-0
    for engine in runs:  # where it ran and the measured seconds differ; the rest must not
        for record in records[engine]:
            for failure in record["failures"]:
                failure.pop("node")
                failure["error"] = re.sub(r"[0-9.]+s >", "_s >", failure["error"])
    assert _close(records["flower"], records["embedded"])
    for summary in runs.values():
        summary.pop("wall_seconds")
    assert _close(runs["flower"], runs["embedded"])


@pytest.mark.parametrize("engine", ["embedded", "flower"])
def test_a_round_with_too_few_replies_fails_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    """min_replies=null (the default): every sampled client must reply."""
    argv = ["train", *FAILING, "rounds=1", f"engine={engine}", f"run_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "mmfed: error: round 1 (fit): 2 of 3 clients replied, fewer than min_replies=all "
        "(text-0: RuntimeError: boom text-0 round 1)"
    ), err
    assert not (tmp_path / "run" / "summary.json").exists()
