"""Start-up cost of the `mmfed` command, as ratios to a bare interpreter that imports torch.

Every command runs in a fresh interpreter (imports are what is measured), interleaved with the two
references `python -c pass` and `python -c "import torch"`, `--repeats` times; the table gives the
median wall time and the median CPU time (user + system of the child) of each, and their ratios to
the torch import. On a loaded machine the wall times swing; CPU times and the ratios much less.

    python eval/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
    "mmfed --help": ["-m", "mmfed.cli", "--help"],
    "mmfed config": ["-m", "mmfed.cli", "config"],
    "mmfed config partition.alpah=1 (error)": ["-m", "mmfed.cli", "config", "partition.alpah=1"],
    "mmfed config partition.alpha=-1 (error)": ["-m", "mmfed.cli", "config", "partition.alpha=-1"],
    "mmfed train partition.alpha=-1 (error)": ["-m", "mmfed.cli", "train", "partition.alpha=-1"],
    "mmfed config algorithm=fedddpm": ["-m", "mmfed.cli", "config", "algorithm=fedddpm"],
    "mmfed config experiment=testbed": ["-m", "mmfed.cli", "config", "experiment=testbed"],
}


def _seconds(args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one fresh interpreter running `args`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, check=False)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():  # interleaved: load changes hit every command alike
            times[name].append(_seconds(command))

    def medians(name: str) -> tuple[float, float]:
        return tuple(statistics.median(v[i] for v in times[name]) for i in (0, 1))  # type: ignore[return-value]

    torch_wall, torch_cpu = medians("python -c 'import torch'")
    width = max(map(len, COMMANDS))
    print(
        f"{'command':<{width}}  wall s  x import torch  CPU s  x import torch   "
        f"(medians of {args.repeats}, interleaved)"
    )
    for name in times:
        wall, cpu = medians(name)
        print(f"{name:<{width}}  {wall:6.2f}  {wall / torch_wall:13.2f}  {cpu:5.2f}  {cpu / torch_cpu:13.2f}")


if __name__ == "__main__":
    main()
