"""Start-up cost of the `mmfed` command, as ratios to a bare interpreter that imports torch.

Every command runs in a fresh interpreter (imports are what is measured), interleaved with the two
references `python -c pass` and `python -c "import torch"`, `--repeats` times; the table gives the
median wall time of each and its ratio to the torch import. On a loaded machine the absolute
numbers swing, the ratios much less.

    python eval/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
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
    "mmfed config algorithm=fedddpm": ["-m", "mmfed.cli", "config", "algorithm=fedddpm"],
}


def _seconds(args: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, check=False)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():  # interleaved: load changes hit every command alike
            times[name].append(_seconds(command))
    torch_seconds = statistics.median(times["python -c 'import torch'"])
    width = max(map(len, COMMANDS))
    print(f"{'command':<{width}}  median s  x import torch   (median of {args.repeats}, interleaved)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<{width}}  {median:8.2f}  {median / torch_seconds:13.2f}")


if __name__ == "__main__":
    main()
