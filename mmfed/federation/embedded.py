"""The embedded engine: every client of a stage, one after another, in this process.

Only one model per client kind exists at a time (see `ModelPool`); each client's personal state
lives on disk between its rounds (`ClientStateStore`), so memory does not grow with the number of
clients.

A client that raises, or takes longer than `client_timeout`, does not stop the stage: the engine
records a `ClientFailure` and returns the replies it has; `Server.run_round` decides whether enough
arrived (`min_replies`). Every engine reports failures the same way, so runs compare across engines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmfed.console import bar_disabled, stage_label
from mmfed.federation.client import ClientApp
from mmfed.protocol import Payload, Reply
from mmfed.utils.io import load_torch, save_torch

log = logging.getLogger("mmfed")


@dataclass(frozen=True)
class ClientFailure:
    """A client that gave no usable reply in one stage of one round, and why (for metrics.jsonl)."""

    round: int
    stage: str
    cid: str
    node: str  # where it ran: "embedded", or the Flower node id
    error: str  # "ValueError: ...", or "timed out: ..."

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_timeout(client_timeout: float | None) -> float | None:
    """`client_timeout` is seconds (> 0) or None (no limit); one-line error naming the key otherwise."""
    if client_timeout is None:
        return None
    if isinstance(client_timeout, bool) or not isinstance(client_timeout, int | float) or client_timeout <= 0:
        raise ValueError(f"client_timeout must be a number of seconds > 0 or null, got {client_timeout!r}")
    return float(client_timeout)


def describe(error: BaseException) -> str:
    """One line for a failure record: the exception type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class ClientStateStore:
    """Personal client state on disk, one file per client per round that changed it.

    A file is named by the round that wrote it; on resume from round R the newest file at or before
    R is read and later ones (from the interrupted round) are ignored and deleted, so a resumed run
    sees exactly the state the uninterrupted run saw.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _files(self, cid: str) -> list[tuple[int, Path]]:
        folder = self.root / cid
        if not folder.is_dir():
            return []
        found = [(int(p.stem.removeprefix("round_")), p) for p in folder.glob("round_*.pt")]
        return sorted(found)

    def load(self, cid: str, before_round: int) -> dict[str, Any]:
        usable = [(r, p) for r, p in self._files(cid) if r < before_round]
        return load_torch(usable[-1][1]) if usable else {}

    def save(self, cid: str, round_: int, state: dict[str, Any]) -> None:
        if state:
            save_torch(state, self.root / cid / f"round_{round_:05d}.pt")

    def rollback(self, committed_round: int) -> None:
        """Forget everything written after `committed_round`; keep only the newest file before it."""
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            files = self._files(folder.name)
            for r, path in files:
                if r > committed_round:
                    path.unlink()
            kept = [(r, p) for r, p in files if r <= committed_round]
            for _, path in kept[:-1]:
                path.unlink()


class EmbeddedEngine:
    """Runs the clients of a stage one after another in this process.

    A client that raises is recorded in `failures` (its state is left as it was). One process cannot
    interrupt a client, so `client_timeout` is checked when the client returns: a late client's
    reply is dropped and recorded as timed out, its state is kept (the work was done), exactly as
    the Flower engine treats a reply that arrives after its deadline.
    """

    def __init__(
        self,
        clients: dict[str, Callable[[], ClientApp]],
        store: ClientStateStore,
        quiet: bool = False,
        client_timeout: float | None = None,
    ) -> None:
        self.clients, self.store, self.quiet = clients, store, quiet
        self.client_timeout = check_timeout(client_timeout)
        self.failures: list[ClientFailure] = []

    def _fail(self, round_: int, stage: str, cid: str, error: str) -> None:
        failure = ClientFailure(round_, stage, cid, "embedded", error)
        self.failures.append(failure)
        log.warning("%s: client %s failed: %s", stage_label(stage, round_), cid, error)

    def run_stage(self, stage: str, round_: int, payloads: dict[str, Payload]) -> dict[str, Reply]:
        replies: dict[str, Reply] = {}
        bar = tqdm(
            payloads.items(),
            desc=stage_label(stage, round_),
            unit="client",
            leave=False,
            disable=bar_disabled(not self.quiet),
        )
        for cid, payload in bar:
            bar.set_postfix_str(cid)
            began = time.perf_counter()
            try:
                client = self.clients[cid]()
                reply, state = client(payload, self.store.load(cid, before_round=round_))
            except Exception as error:  # a client's failure is reported, not fatal (see Server.min_replies)
                log.debug("client %s raised", cid, exc_info=True)
                self._fail(round_, stage, cid, describe(error))
                continue
            seconds = time.perf_counter() - began
            self.store.save(cid, round_, state)
            if self.client_timeout is not None and seconds > self.client_timeout:
                self._fail(
                    round_, stage, cid, f"timed out: {seconds:.1f}s > client_timeout={self.client_timeout:g}s"
                )
                continue
            replies[cid] = reply
        return replies
