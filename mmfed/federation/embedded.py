"""The embedded engine: every client of a stage, one after another, in this process.

Only one model per client kind exists at a time (see `ModelPool`); each client's personal state
lives on disk between its rounds (`ClientStateStore`), so memory does not grow with the number of
clients.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmfed.federation.client import ClientApp
from mmfed.protocol import Payload, Reply
from mmfed.utils.io import load_torch, save_torch


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
    def __init__(
        self, clients: dict[str, Callable[[], ClientApp]], store: ClientStateStore, quiet: bool = False
    ) -> None:
        self.clients, self.store, self.quiet = clients, store, quiet

    def run_stage(self, stage: str, round_: int, payloads: dict[str, Payload]) -> dict[str, Reply]:
        replies: dict[str, Reply] = {}
        bar = tqdm(
            payloads.items(), desc=f"round {round_} {stage}", unit="client", leave=False, disable=self.quiet
        )
        for cid, payload in bar:
            bar.set_postfix_str(cid)
            client = self.clients[cid]()
            reply, state = client(payload, self.store.load(cid, before_round=round_))
            self.store.save(cid, round_, state)
            replies[cid] = reply
        return replies
