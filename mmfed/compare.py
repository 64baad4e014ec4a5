"""`mmfed compare RUN_DIR... | SWEEP_DIR`: final metrics of several runs side by side.

Runs are grouped by the config keys whose values differ between them (the seed excepted, and keys
that only name a run: `name`, `run_dir`, `sweep_dir`, `resume`, `quiet`, `logger`); each group
shows mean ± std over its runs (its seeds). The final metrics are each run's `summary.json` (test
metrics of the model selected on validation). Learning curves of every metric the runs log per
round (`val/...`, `train/loss` by default) are overlaid, one PNG per metric, one line per group
(the mean over seeds, with a band of ± one std).

`--baseline TEXT` names one group (the one whose label contains TEXT): every other group then
also gets, per metric, the mean of its per-seed differences to that group (runs paired by seed;
seeds only one side has are left out) with a 95 % Student-t interval, the comparison the README's
tables report, since seeds share data, partitions and initial weights and so pair.

The table is Markdown, so it pastes into an issue or README as is; `compare.json` holds the same
numbers (strict JSON).
"""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mmfed.utils.io import read_summary, save_json, summary_key

NOT_A_SETTING = ("name", "run_dir", "sweep_dir", "resume", "quiet", "logger", "wandb_project")
SEED = "seed"
# Final metrics shown by default (those present); --metrics takes glob patterns instead (a bare
# metric, e.g. retrieval/*, means its test/ key). Old summaries are read in the current keys.
DEFAULT_METRICS = (
    "test/retrieval/rsum",
    "test/retrieval/i2t/R@1",
    "test/retrieval/t2i/R@1",
    "test/classification/image/acc",
    "test/classification/text/acc",
    "local/*/acc/mean",
)
DEFAULT_CURVES = ("val/*", "train/loss")


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders (with config.yaml) among `paths`, a sweep folder standing for the runs inside it."""
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "config.yaml").exists():
            runs.append(path)
            continue
        inside = sorted(p.parent for p in path.glob("*/config.yaml")) if path.is_dir() else []
        if not inside:
            raise FileNotFoundError(f"{path} is neither a run folder (config.yaml) nor a folder of runs")
        runs.extend(inside)
    return list(dict.fromkeys(runs))


def load_config(run: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=False)  # saved resolved


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists as strings, so they compare)."""
    if not isinstance(node, dict) or not node:
        leaf = node if isinstance(node, (int, float, str, bool, type(None))) else str(node)
        return {prefix[:-1]: leaf}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def _node(config: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def setting(config: dict[str, Any], key: str) -> str:
    """The value of a differing key in one run; a collapsed key (a dict) shows its entries' names."""
    node = _node(config, key)
    return ",".join(node) if isinstance(node, dict) else str(node)


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between runs (seed and run names excepted).

    A key some runs lack (choosing algorithm=fedprox adds algorithm.loss_terms.prox.*) is replaced
    by its deepest ancestor every run has, shown by its entries (``algorithm.loss_terms=...,prox``).
    """
    flats = [flatten(c) for c in configs]
    skip = (*NOT_A_SETTING, SEED)
    found: list[str] = []
    for key in sorted({k for f in flats for k in f}):
        if key.split(".")[0] in skip or len({repr(f.get(key, "<unset>")) for f in flats}) < 2:
            continue
        if any(key not in f for f in flats):
            parts = key.split(".")
            while parts and not all(isinstance(_node(c, ".".join(parts)), dict) for c in configs):
                parts.pop()
            key = ".".join(parts)
        if key and key not in found:
            found.append(key)
    return found


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# Two-sided 95 % quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df));
# the normal 1.96 above 30 (t is within 2 % of it there).
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042,
}


def t975(df: int) -> float:
    """The 95 % two-sided t quantile for `df` degrees of freedom (the next tabulated df down)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def paired_difference(a: list[float | None], b: list[float | None]) -> tuple[float, float, float, int] | None:
    """Mean of the per-seed differences a - b (positions are seeds; None: that seed is missing)
    and its 95 % t interval: (mean, low, high, pairs); None with fewer than two pairs."""
    diffs = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if len(diffs) < 2:
        return None
    mean, std = mean_std(diffs)
    half = t975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


def _numbers(summary: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _pick(names: list[str], patterns: tuple[str, ...] | list[str]) -> list[str]:
    picked: list[str] = []
    for pattern in patterns:
        picked += [n for n in names if fnmatch.fnmatchcase(n, pattern) and n not in picked]
    return picked


def compare_runs(
    paths: list[str | Path],
    metrics: list[str] | None = None,
    curves: list[str] | None = None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Group the runs by their differing config keys; mean ± std of each final metric per group,
    and with `baseline` each group's paired differences to the group whose label contains it."""
    runs = find_runs(paths)
    configs = [load_config(run) for run in runs]
    keys = differing_keys(configs)
    finished: list[tuple[Path, dict[str, Any], dict[str, float]]] = []
    unfinished: list[str] = []
    for run, config in zip(runs, configs, strict=True):
        if (run / "summary.json").exists():
            finished.append((run, config, _numbers(read_summary(run / "summary.json"))))
        else:
            unfinished.append(str(run))
    names = sorted({k for _, _, s in finished for k in s})
    shown = _pick(names, [summary_key(p) for p in metrics] if metrics else DEFAULT_METRICS)
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for run, config, summary in finished:
        label = tuple(f"{k}={setting(config, k)}" for k in keys)
        group = groups.setdefault(
            label, {"settings": dict(zip(keys, label, strict=True)), "runs": [], "seeds": []}
        )
        group["runs"].append(str(run))
        group["seeds"].append(config.get(SEED))
        group.setdefault("values", []).append(summary)
    rows = []
    for label, group in groups.items():
        row: dict[str, Any] = {
            "group": ", ".join(label) or "(all runs)",
            "settings": {k: v.split("=", 1)[1] for k, v in group["settings"].items()},
            "runs": group["runs"],
            "seeds": group["seeds"],
            "metrics": {},
        }
        for metric in shown:
            values = [s[metric] for s in group["values"] if metric in s]
            if values:
                mean, std = mean_std(values)
                row["metrics"][metric] = {"mean": mean, "std": std, "n": len(values)}
        rows.append(row)
    base = _baseline_group(rows, baseline) if baseline is not None else None
    if base is not None:
        grouped = list(groups.values())  # in the order of rows
        theirs = dict(zip(base["seeds"], grouped[rows.index(base)]["values"], strict=True))
        for row, group in zip(rows, grouped, strict=True):
            if row is base:
                continue
            row["paired_to_baseline"] = {}
            mine = dict(zip(row["seeds"], group["values"], strict=True))
            seeds = sorted(set(mine) & set(theirs), key=str)
            for metric in shown:
                result = paired_difference(
                    [mine[s].get(metric) for s in seeds], [theirs[s].get(metric) for s in seeds]
                )
                if result is not None:
                    mean, low, high, n = result
                    row["paired_to_baseline"][metric] = {"mean": mean, "low": low, "high": high, "n": n}
    return {
        "keys": keys,
        "metrics": shown,
        "baseline": None if base is None else base["group"],
        "groups": rows,
        "unfinished": unfinished,
        "curves": _pick_curves(finished, curves),
    }


def _baseline_group(rows: list[dict[str, Any]], text: str) -> dict[str, Any]:
    """The one group whose label contains `text` (a ValueError naming the labels otherwise)."""
    matches = [row for row in rows if text in row["group"]]
    if len(matches) != 1:
        found = "none" if not matches else f"{len(matches)}"
        labels = "; ".join(row["group"] for row in rows)
        raise ValueError(f"--baseline {text!r} must match exactly one group, matched {found}: {labels}")
    return matches[0]


def _pick_curves(
    finished: list[tuple[Path, dict[str, Any], dict[str, float]]], curves: list[str] | None
) -> list[str]:
    from mmfed.report import read_metrics

    names: set[str] = set()
    for run, _, _ in finished:
        for record in read_metrics(run):
            names.update(
                k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
    return _pick(sorted(names), curves or DEFAULT_CURVES)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per group, `mean ± std (n)` per metric."""
    metrics = result["metrics"]
    head = ["group", "runs", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["groups"]:
        cells = [row["group"], str(len(row["runs"]))]
        for metric in metrics:
            entry = row["metrics"].get(metric)
            cells.append("-" if entry is None else f"{entry['mean']:.2f} ± {entry['std']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    paired = [row for row in result["groups"] if row.get("paired_to_baseline")]
    if paired:
        title = f"Paired differences to {result['baseline']} (mean over seeds [95 % t interval], pairs):"
        lines += ["", title, ""]
        lines += ["| " + " | ".join(["group", *metrics]) + " |", "|" + "---|" * (len(metrics) + 1)]
        for row in paired:
            cells = [row["group"]]
            for metric in metrics:
                d = row["paired_to_baseline"].get(metric)
                cells.append(
                    "-" if d is None else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] ({d['n']})"
                )
            lines.append("| " + " | ".join(cells) + " |")
    if result["unfinished"]:
        lines.append(f"not finished (no summary.json): {', '.join(result['unfinished'])}")
    return "\n".join(lines)


def plot_curves(result: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per metric: each group's mean over its runs per round, with a ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from mmfed.report import read_metrics

    records = {run: read_metrics(run) for row in result["groups"] for run in row["runs"]}
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for metric in result["curves"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
        drawn = False
        for row in result["groups"]:
            by_round: dict[int, list[float]] = {}
            for run in row["runs"]:
                for record in records[run]:
                    if metric in record:
                        by_round.setdefault(int(record["round"]), []).append(float(record[metric]))
            if not by_round:
                continue
            rounds = sorted(by_round)
            stats = [mean_std(by_round[r]) for r in rounds]
            means = [m for m, _ in stats]
            line = ax.plot(rounds, means, marker="o", markersize=3, label=row["group"] or "(all runs)")[0]
            ax.fill_between(
                rounds,
                [m - s for m, s in stats],
                [m + s for m, s in stats],
                color=line.get_color(),
                alpha=0.2,
            )
            drawn = True
        if drawn:
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
            fig.tight_layout()
            path = out / f"{re.sub(r'[^A-Za-z0-9_.@-]+', '_', metric)}.png"
            fig.savefig(path)
            written.append(path)
        plt.close(fig)
    return written


def compare(
    paths: list[str | Path],
    out: str | Path | None = None,
    metrics: list[str] | None = None,
    curves: list[str] | None = None,
    baseline: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """Table + curves; writes `compare.json`, `compare.md` and the PNGs into `out` (returns it)."""
    result = compare_runs(paths, metrics, curves, baseline)
    if out is None:  # one sweep folder: beside its runs; else ./compare
        single = Path(paths[0]) if len(paths) == 1 else None
        out = single / "compare" if single and not (single / "config.yaml").exists() else Path("compare")
    out = Path(out)
    result["plots"] = [str(p) for p in plot_curves(result, out)]
    save_json(result, out / "compare.json")
    (out / "compare.md").write_text(format_table(result) + "\n")
    return result, out
