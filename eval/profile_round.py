"""Where a default round's time goes: an exclusive-time breakdown of `mmfed train` rounds.

Builds the default federation (`mmfed train` with no overrides but the run folder, the round
count and ``workers=1``: the timers see only this process, so the clients run here, one after
another, as in a `workers=1` run; a `workers=N` round is measured by `mmfed train` itself), runs
``--rounds`` rounds (default 2: round 1 pays one-off costs such as building the pooled models; the
table is the mean of the later rounds) and attributes every second to one bucket. Buckets are
exclusive (a timer inside another is subtracted from it), so they add up to the round; what no
timer covers is ``other``:

- ``data/batching`` (ClientData.batches: permutation, row gathers, caption draw), ``data/tokenising``
  (the text encoders' tokenizer), ``client/build`` (Federation.client_app: the client's split
  subsets), ``client/model reset+load`` (ModelPool.get, payload and personal-state loading);
- ``<kind>/forward`` (encoders and loss terms while training), ``<kind>/backward``,
  ``<kind>/optimizer`` (zero_grad, grad clipping, step) per client kind;
- ``payload/encode`` (encode_tensors), ``payload/bytes`` (byte counting), ``server/broadcast``,
  ``server/aggregate``; ``state store`` (ClientStateStore load/save/rollback); ``checkpoint writes``
  (save_torch of last.pt / best.pt); ``validation`` (Evaluator.evaluate on the val split).

Wall and CPU seconds (``time.process_time``) are both recorded: on a shared machine CPU time is the
steadier measure of the work. A fixed calibration workload (a 512 x 512 x 512 float32 matmul
loop and a small CNN training step, one thread) is timed in the same process before and after, so
``rounds per calibration unit`` survives machine speed. ``--threads 1,2`` repeats the whole
measurement per torch thread count (interleaved by round) to compare them.

    python eval/profile_round.py [--rounds 2] [--threads 1,2] [override ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import mmfed  # noqa: F401  (the torchvision guard)

RESULTS = Path(__file__).resolve().parent / "results" / "profile_round"


class Buckets:
    """Exclusive wall/CPU time per bucket name; nested timers subtract from their parent."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # per open timer: [child wall, child cpu]
        self.kind = "?"  # the client kind being trained (set by the ClientApp wrapper)
        self.phase = "round"  # "fit" while a client trains

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        self._stack.append([0.0, 0.0])
        try:
            yield
        finally:
            child_wall, child_cpu = self._stack.pop()
            spent_wall, spent_cpu = time.perf_counter() - wall, time.process_time() - cpu
            self.wall[name] += spent_wall - child_wall
            self.cpu[name] += spent_cpu - child_cpu
            if self._stack:
                self._stack[-1][0] += spent_wall
                self._stack[-1][1] += spent_cpu

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()


def _wrap(owner: Any, attribute: str, name: Callable[[], str] | str, buckets: Buckets) -> None:
    """Replace owner.attribute by a timed version (a function or method)."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with buckets.timer(name() if callable(name) else name):
            return original(*args, **kwargs)

    setattr(owner, attribute, timed)


def _wrap_generator(owner: Any, attribute: str, name: str, buckets: Buckets) -> None:
    """Time every step of a generator method (the batches are made lazily, between training steps)."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        iterator = original(*args, **kwargs)
        while True:
            with buckets.timer(name):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    setattr(owner, attribute, timed)


def instrument(buckets: Buckets) -> None:
    """Timers around the pieces of a round (class-level patches: every instance is covered)."""
    from mmfed.algorithms.base import LossTerm, ServerStep
    from mmfed.evaluation import Evaluator
    from mmfed.federation import client as client_module
    from mmfed.federation import run as run_module
    from mmfed.federation.client import ClientApp, ClientData, ModelPool
    from mmfed.federation.embedded import ClientStateStore
    from mmfed.models.multimodal import MultimodalModel
    from mmfed.models.tokenizer import HashingTokenizer
    from mmfed.protocol import Message

    def kind_bucket(what: str) -> Callable[[], str]:
        """Training work by client kind; the same calls elsewhere count for their phase (validation)."""
        return lambda: f"{buckets.kind}/{what}" if buckets.phase == "fit" else buckets.phase

    original_call = ClientApp.__call__

    def client_call(self: ClientApp, payload: Any, state: Any) -> Any:
        buckets.kind, buckets.phase = self.spec.kind, "fit"
        try:
            with buckets.timer(f"{self.spec.kind}/other client work"):
                return original_call(self, payload, state)
        finally:
            buckets.phase = "round"

    ClientApp.__call__ = client_call  # type: ignore[method-assign]
    _wrap_generator(ClientData, "batches", "data/batching", buckets)
    _wrap(HashingTokenizer, "__call__", lambda: f"data/tokenising ({buckets.phase})", buckets)
    _wrap(run_module.Federation, "client_app", "client/build", buckets)
    _wrap(ModelPool, "get", "client/model reset+load", buckets)
    _wrap(MultimodalModel, "load_part_state", "client/model reset+load", buckets)
    _wrap(MultimodalModel, "encode_images", kind_bucket("forward"), buckets)
    _wrap(MultimodalModel, "encode_texts", kind_bucket("forward"), buckets)
    _wrap(LossTerm, "__call__", kind_bucket("forward"), buckets)
    _wrap(torch.Tensor, "backward", kind_bucket("backward"), buckets)
    _wrap(torch.nn.utils, "clip_grad_norm_", kind_bucket("optimizer"), buckets)
    for optimizer in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        _wrap(optimizer, "step", kind_bucket("optimizer"), buckets)
        _wrap(optimizer, "zero_grad", kind_bucket("optimizer"), buckets)
    _wrap(client_module, "encode_tensors", "payload/encode", buckets)
    nbytes = Message.nbytes.fget  # a property: wrap its getter
    Message.nbytes = property(lambda self: _timed_call(buckets, "payload/bytes", nbytes, self))  # type: ignore[assignment,method-assign]
    for method in ("load", "save", "rollback"):
        _wrap(ClientStateStore, method, "state store", buckets)
    _wrap(run_module, "save_torch", "checkpoint writes", buckets)
    evaluate = Evaluator.evaluate

    def evaluate_phase(self: Evaluator, *args: Any, **kwargs: Any) -> Any:
        outer, buckets.phase = buckets.phase, "validation"
        try:
            with buckets.timer("validation"):
                return evaluate(self, *args, **kwargs)
        finally:
            buckets.phase = outer

    Evaluator.evaluate = evaluate_phase  # type: ignore[method-assign]
    for cls in _subclasses(ServerStep):
        if "broadcast" in vars(cls):
            _wrap(cls, "broadcast", "server/broadcast", buckets)
        if "aggregate" in vars(cls):
            _wrap(cls, "aggregate", "server/aggregate", buckets)


def _timed_call(buckets: Buckets, name: str, function: Callable[..., Any], *args: Any) -> Any:
    with buckets.timer(name):
        return function(*args)


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def calibration(repeats: int = 5) -> dict[str, float]:
    """A fixed workload (1 thread): 40 512^3 float32 matmuls + 20 steps of a small CNN. Median seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)

    def work() -> None:
        for _ in range(40):
            a @ b
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    work()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    torch.set_num_threads(threads)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


class RoundClock:
    """Splits one `Run.train` into rounds: a round runs from one `run_round` call to the next (its
    validation, metrics line and checkpoints included); the last ends where `finish` begins. Sets
    the round's torch thread count (cycling through `threads`) as it starts."""

    def __init__(self, buckets: Buckets, threads: list[int]) -> None:
        self.buckets, self.threads = buckets, threads
        self.rounds: list[dict[str, Any]] = []
        self._start: tuple[float, float] | None = None

    def close(self) -> None:
        if self._start is not None:
            wall, cpu = time.perf_counter() - self._start[0], time.process_time() - self._start[1]
            self.rounds[-1].update(
                wall_s=wall,
                cpu_s=cpu,
                buckets_wall=dict(self.buckets.wall),
                buckets_cpu=dict(self.buckets.cpu),
            )
            RESULTS.mkdir(parents=True, exist_ok=True)  # each round as it ends: a cut-short run keeps them
            with (RESULTS / "rounds-partial.jsonl").open("a") as handle:
                handle.write(json.dumps(self.rounds[-1]) + "\n")
        self._start = None

    def open(self, round_: int) -> None:
        self.close()
        threads = self.threads[(round_ - 1) % len(self.threads)]
        torch.set_num_threads(threads)
        self.buckets.reset()
        self.rounds.append({"round": round_, "threads": threads})
        self._start = (time.perf_counter(), time.process_time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads", default=None, help="comma-separated torch thread counts, cycled by round"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides (default: none, the default run)")
    args = parser.parse_args()
    from mmfed.cli import compose
    from mmfed.federation.run import Run
    from mmfed.federation.server import Server

    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    buckets = Buckets()
    instrument(buckets)
    clock = RoundClock(buckets, threads)
    run_round = Server.run_round

    def clocked_round(self: Server, round_: int, engine: Any) -> Any:
        clock.open(round_)
        return run_round(self, round_, engine)

    def no_finish(self: Run, *args: Any) -> dict[str, Any]:
        clock.close()  # the test split, per-client evaluation and plots are not part of a round
        return {}

    Server.run_round = clocked_round  # type: ignore[method-assign]
    Run.finish = no_finish  # type: ignore[method-assign]
    (RESULTS / "rounds-partial.jsonl").unlink(missing_ok=True)  # this run's rounds only
    calib_before = calibration()
    tmp = Path(tempfile.mkdtemp(prefix="profile_round_"))
    try:
        # workers=1 first so that an override can still ask for workers (then only the parent is timed)
        base = ["workers=1", *args.overrides]
        cfg = compose([*base, f"rounds={args.rounds}", "quiet=true", f"run_dir={tmp}/run"])
        began = time.perf_counter()
        run = Run(cfg)
        setup = time.perf_counter() - began
        run.train()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    calib_after = calibration()
    calib = {k: (calib_before[k] + calib_after[k]) / 2 for k in calib_before}
    report(clock.rounds, setup, calib, calib_before, calib_after, args)


def report(
    rounds: list[dict[str, Any]],
    setup: float,
    calib: dict[str, float],
    calib_before: dict[str, float],
    calib_after: dict[str, float],
    args: argparse.Namespace,
) -> None:
    """A table per thread count over the rounds after the first (round 1 pays one-off costs)."""
    print(
        f"default run ({' '.join(args.overrides) or 'no overrides'}), "
        f"{platform.processor() or platform.machine()}; "
        f"setup {setup:.1f} s; round 1 {rounds[0]['wall_s']:.1f} s wall; calibration "
        f"{calib['wall_s']:.2f} s wall / {calib['cpu_s']:.2f} s CPU "
        f"(before {calib_before['wall_s']:.2f}, after {calib_after['wall_s']:.2f})"
    )
    summary: dict[str, Any] = {"calibration": calib, "setup_wall_s": setup, "rounds": rounds, "threads": {}}
    later = rounds[1:] or rounds
    for threads in sorted({r["threads"] for r in later}):
        mine = [r for r in later if r["threads"] == threads]
        wall = statistics.mean(r["wall_s"] for r in mine)
        cpu = statistics.mean(r["cpu_s"] for r in mine)
        names = {n for r in mine for n in r["buckets_wall"]}
        per_wall = {n: statistics.mean(r["buckets_wall"].get(n, 0.0) for r in mine) for n in names}
        per_cpu = {n: statistics.mean(r["buckets_cpu"].get(n, 0.0) for r in mine) for n in names}
        per_wall["other"] = wall - sum(per_wall.values())
        per_cpu["other"] = cpu - sum(per_cpu.values())
        print(
            f"\n{threads} torch thread(s), rounds {[r['round'] for r in mine]}: {wall:.1f} s wall, "
            f"{cpu:.1f} s CPU per round = {wall / calib['wall_s']:.1f} calibration units (wall), "
            f"{cpu / calib['cpu_s']:.1f} (CPU); "
            f"{60 / wall:.2f} rounds/min here"
        )
        print("| bucket | wall s | % of round (wall) | CPU s | % of round (CPU) |")
        print("| --- | --- | --- | --- | --- |")
        for name in sorted(per_wall, key=lambda n: -per_cpu[n]):
            print(
                f"| {name} | {per_wall[name]:.2f} | {100 * per_wall[name] / wall:.1f} | "
                f"{per_cpu[name]:.2f} | {100 * per_cpu[name] / max(cpu, 1e-9):.1f} |"
            )
        summary["threads"][threads] = {
            "round_wall_s": wall,
            "round_cpu_s": cpu,
            "round_in_calibration_units_wall": wall / calib["wall_s"],
            "round_in_calibration_units_cpu": cpu / calib["cpu_s"],
            "buckets_wall": per_wall,
            "buckets_cpu": per_cpu,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "-".join(str(t) for t in sorted({r["threads"] for r in rounds}))
    # one file per configuration: a profile with overrides must not overwrite the default run's
    slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", "+".join(args.overrides)) if args.overrides else "default"
    out = RESULTS / f"{slug}-threads{tag}.json"
    summary.update(torch=torch.__version__, python=sys.version.split()[0], overrides=args.overrides)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
