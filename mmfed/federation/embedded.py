"""The embedded engine: the clients of a stage in this machine, one after another in this process
or (`workers` > 1) spread over forked worker processes.

Only one model per client kind exists at a time (see `ModelPool`); each client's personal state
lives on disk between its rounds (`ClientStateStore`), so memory does not grow with the number of
clients.

A client that raises, or takes longer than `client_timeout`, does not stop the stage: the engine
records a `ClientFailure` and returns the replies it has; `Server.run_round` decides whether enough
arrived (`min_replies`). Every engine reports failures the same way, so runs compare across engines.

Why worker processes: a client's training step on 2 threads runs only 1.48x faster than on one
(measured, README "Performance"), so on a 2-core machine two single-thread clients at once give
1.3x the throughput of one 2-thread client. The workers are forked once, at the first stage, so
they inherit the built federation (world, partitions, client factories) without pickling it;
payloads, client state and replies travel by pickle (torch's shared-memory tensor reductions).
Clients are independent within a stage (each is seeded by run seed, round and client id and reads
the server only through its payload, as under Flower), so with `workers=N` every client computes
what it computes in one process at the workers' thread count; the server's steps and evaluation
stay in this process at its `threads` (with `threads=1`, as in the tests, a run equals its
`workers=1` twin bit for bit). The client state store stays in this process: it loads a client's
state for the task and saves what comes back.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
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

    def empty(self) -> bool:
        """No client holds personal state (nothing saved yet, or nothing ever to save)."""
        return not self.root.is_dir() or next(self.root.glob("*/round_*.pt"), None) is None

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


def resolve_workers(workers: int | str) -> int:
    """`workers` as a count: ``auto`` is one per usable core where the OS can fork (else 1)."""
    if workers == "auto":
        if "fork" not in multiprocessing.get_all_start_methods():
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, cores or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 or 'auto', got {workers!r}")
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(f"workers={workers} needs the 'fork' start method, which this OS lacks: use 1")
    return workers


# What a forked worker runs clients with: set in the parent just before the pool forks.
_WORKER_CLIENTS: dict[str, Callable[[], ClientApp]] = {}


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_client(cid: str, payload: Payload, state: dict[str, Any]) -> tuple[bool, Any, Any, float]:
    """In a worker: (ok, reply or error line, new state, seconds)."""
    began = time.perf_counter()
    try:
        reply, state = _WORKER_CLIENTS[cid]()(payload, state)
    except Exception as error:  # reported by the parent as a failure, as in this process
        log.debug("client %s raised", cid, exc_info=True)
        return False, describe(error), None, time.perf_counter() - began
    return True, reply, state, time.perf_counter() - began


class EmbeddedEngine:
    """Runs the clients of a stage one after another in this process, or over `workers` forked
    processes (each with `worker_threads` torch threads).

    A client that raises is recorded in `failures` (its state is left as it was). One process cannot
    interrupt a client, so `client_timeout` is checked when the client returns: a late client's
    reply is dropped and recorded as timed out, its state is kept (the work was done), exactly as
    the Flower engine treats a reply that arrives after its deadline. Replies and failures come in
    payload order whatever order the workers finish in.
    """

    def __init__(
        self,
        clients: dict[str, Callable[[], ClientApp]],
        store: ClientStateStore,
        quiet: bool = False,
        client_timeout: float | None = None,
        workers: int = 1,
        worker_threads: int = 1,
        costs: dict[str, float] | None = None,
    ) -> None:
        self.clients, self.store, self.quiet = clients, store, quiet
        self.costs = costs or {}  # relative work per client: workers start the largest first
        self.client_timeout = check_timeout(client_timeout)
        self.workers, self.worker_threads = int(workers), int(worker_threads)
        self.failures: list[ClientFailure] = []
        self._pool: ProcessPoolExecutor | None = None

    def _fail(self, round_: int, stage: str, cid: str, error: str) -> None:
        failure = ClientFailure(round_, stage, cid, "embedded", error)
        self.failures.append(failure)
        log.warning("%s: client %s failed: %s", stage_label(stage, round_), cid, error)

    def _finish(
        self, round_: int, stage: str, cid: str, outcome: tuple[bool, Any, Any, float], replies: dict
    ) -> None:
        """Record one client's outcome: a failure, a late reply (state kept) or a reply."""
        ok, reply, state, seconds = outcome
        if not ok:
            self._fail(round_, stage, cid, reply)
            return
        self.store.save(cid, round_, state)
        if self.client_timeout is not None and seconds > self.client_timeout:
            late = f"timed out: {seconds:.1f}s > client_timeout={self.client_timeout:g}s"
            self._fail(round_, stage, cid, late)
            return
        replies[cid] = reply

    def run_stage(self, stage: str, round_: int, payloads: dict[str, Payload]) -> dict[str, Reply]:
        if self.workers > 1:  # even for one client: it trains at the workers' thread count, as all do
            return self._run_parallel(stage, round_, payloads)
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
            self._finish(round_, stage, cid, (True, reply, state, time.perf_counter() - began), replies)
        return replies

    def _run_parallel(self, stage: str, round_: int, payloads: dict[str, Payload]) -> dict[str, Reply]:
        if self._pool is None:  # fork once, now that the federation the factories read is built
            _WORKER_CLIENTS.clear()
            _WORKER_CLIENTS.update(self.clients)
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(self.worker_threads,),
            )
        # Largest first (longest-processing-time order): a paired client costs ~1.75 unimodal image
        # ones (run.ROW_COST), and submission order alone left a worker idle at the end of a stage.
        order = sorted(payloads, key=lambda cid: -self.costs.get(cid, 1.0))
        futures: dict[Future, str] = {
            self._pool.submit(_run_client, cid, payloads[cid], self.store.load(cid, before_round=round_)): cid
            for cid in order
        }
        outcomes: dict[str, tuple[bool, Any, Any, float]] = {}
        bar = tqdm(
            total=len(futures),
            desc=stage_label(stage, round_),
            unit="client",
            leave=False,
            disable=bar_disabled(not self.quiet),
        )
        broken = False
        for future in as_completed(futures):
            try:
                outcomes[futures[future]] = future.result()
            except Exception as error:  # the worker process died (killed, out of memory): a failure
                outcomes[futures[future]] = (False, f"worker process lost: {describe(error)}", None, 0.0)
                broken = True
            bar.update()
            bar.set_postfix_str(futures[future])
        bar.close()
        if broken:  # a pool with a dead worker refuses new tasks: fork a fresh one next stage
            self.close()
        replies: dict[str, Reply] = {}
        for cid in payloads:
            self._finish(round_, stage, cid, outcomes[cid], replies)
        return replies

    def close(self) -> None:
        """Stop the worker processes (a no-op without them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
