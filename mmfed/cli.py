"""The `mmfed` command: ``mmfed train [key=value ...]``, ``mmfed report RUN_DIR``,
``mmfed eval RUN_DIR protocol=NAME``, ``mmfed personalize RUN_DIR``, ``mmfed teacher pretrain|extract``.

Configs are composed with Hydra's compose API from ``configs/`` (the repository's, or --config-dir)
plus the structured configs every component registers. Any error in the config or the input is
reported as one line naming the bad key, value or file, with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from mmfed.composition import REPO_CONFIGS, compose, config_dir  # noqa: F401  (the CLI's API, below it)
from mmfed.composition import one_line as _one_line


def _train(args: argparse.Namespace) -> int:
    if args.multirun:  # every combination of the swept overrides, each in its own run folder
        from mmfed.sweep import run_sweep

        return run_sweep(args.overrides, args.config_dir)
    from mmfed.console import configure_progress, format_summary
    from mmfed.resume import resume_config

    began = time.perf_counter()
    # resume=true: the run folder's saved config (overrides that differ from it are an error)
    cfg = resume_config(args.overrides, lambda overrides: compose(overrides, args.config_dir))
    from mmfed.federation.launch import train  # torch: after the config is checked (errors come at once)

    configure_progress(bool(cfg.quiet))  # bars on a terminal, one line per round in a log, none if quiet
    summary = train(cfg)
    print(format_summary(summary, cfg.run_dir, time.perf_counter() - began))
    return 0


def _report(args: argparse.Namespace) -> int:
    from mmfed.report import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    summary = Path(args.run_dir) / "summary.json"
    if summary.exists():  # a finished run: its table (every number stays in summary.json)
        from mmfed.console import format_summary
        from mmfed.utils.io import read_summary

        print(format_summary(read_summary(summary), args.run_dir))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mmfed.eval_protocols import evaluate_run, format_result

    result = evaluate_run(args.run_dir, args.options)
    print(format_result(result))
    print(f"saved {Path(args.run_dir) / 'eval' / (result['protocol'] + '.json')}")
    return 0


def _personalize(args: argparse.Namespace) -> int:
    from mmfed.personalize import OUT, format_summary, personalize_run

    summary = personalize_run(args.run_dir, args.overrides)
    print(format_summary(summary))
    print(f"saved {Path(args.run_dir) / OUT}")
    return 0


def _teacher(args: argparse.Namespace) -> int:
    if args.action == "pretrain":
        from mmfed.teacher.pretrain import format_result, pretrain_from_overrides

        quiet = any(o.lower() in ("quiet=true", "quiet=1") for o in args.overrides)
        overrides = [o for o in args.overrides if not o.startswith("quiet=")]
        print(format_result(pretrain_from_overrides(overrides, quiet=quiet)))
    else:
        from mmfed.teacher.features import extract_from_overrides, format_extraction, split_extract_options

        options, overrides = split_extract_options(args.overrides)
        cfg = compose(overrides, args.config_dir)
        print(format_extraction(extract_from_overrides(cfg, options)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mmfed.compare import compare, format_table

    def patterns(text: str | None) -> list[str] | None:
        return [p for p in text.split(",") if p] if text else None

    result, out = compare(args.runs, args.out, patterns(args.metrics), patterns(args.curves), args.baseline)
    print(format_table(result))
    print(f"saved {out / 'compare.json'}, {out / 'compare.md'} and {len(result['plots'])} curves in {out}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(compose(args.overrides, args.config_dir)))
    return 0


_USER_ERRORS = (  # bad input, not a bug: one line and exit 2 ("module:class")
    "mmfed.config:ConfigError",
    "mmfed.federation.run:RunError",
    "mmfed.federation.folder:RunFolderError",
    "mmfed.federation.server:RoundFailed",
    "mmfed.models.encoders:PretrainedLoadError",
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The bad-input error types, taken from the modules already loaded: an error whose module never
    loaded cannot have been raised, and importing the federation only to name its errors would cost
    `mmfed config` seconds."""
    types: list[type[BaseException]] = [FileNotFoundError, ValueError]
    for entry in _USER_ERRORS:
        module, name = entry.split(":")
        error_type = getattr(sys.modules.get(module), name, None)
        if error_type is not None:
            types.append(error_type)
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfed", description="Multimodal federated learning.")
    parser.add_argument(
        "--config-dir", default=None, help="folder holding config.yaml (default: the repo's configs/)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a federation: mmfed train [key=value ...]")
    train.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides, e.g. rounds=5 partition.alpha=0.1; quiet=true: only the final table (a quiet "
        "log); name=NAME resume=true: continue runs/NAME with its saved config",
    )
    train.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="sweep: seed=0,1,2 algorithm=fedavg,fedprox",
    )
    train.set_defaults(run=_train)
    show = commands.add_parser("config", help="print the composed config for these overrides")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(run=_show)
    report = commands.add_parser("report", help="(re)draw a run's plots and print its summary")
    report.add_argument("run_dir")
    report.set_defaults(run=_report)
    comparison = commands.add_parser(
        "compare", help="final metrics of runs (or sweep folders), grouped by differing config keys"
    )
    comparison.add_argument("runs", nargs="+", help="run folders and/or sweep folders")
    comparison.add_argument("--out", default=None, help="output folder (default: SWEEP/compare or ./compare)")
    comparison.add_argument("--metrics", default=None, help="final metrics, comma-separated globs")
    comparison.add_argument("--curves", default=None, help="per-round metrics to plot (globs)")
    comparison.add_argument(
        "--baseline", default=None, help="a group (text in its label): paired differences to it by seed"
    )
    comparison.set_defaults(run=_compare)
    evaluate = commands.add_parser("eval", help="evaluate a run's checkpoint on a protocol (coco-1k, ...)")
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "options",
        nargs="*",
        help="protocol=coco-1k|coco-5k|flickr30k-1k|cifar10|..., checkpoint=best|last|PATH, fold_size=N, "
        "batch_size=N, backend=auto|torch|faiss, device=..., quiet=true, data.<key>=VALUE",
    )
    evaluate.set_defaults(run=_eval)
    personalize = commands.add_parser(
        "personalize", help="per-client LoRA adapters + head on a finished run: global vs personalized"
    )
    personalize.add_argument("run_dir")
    personalize.add_argument(
        "overrides", nargs="*", help="personalize.* keys, e.g. epochs=5 lr=3e-3 rank=8 clients=[image-0]"
    )
    personalize.set_defaults(run=_personalize)
    teacher = commands.add_parser(
        "teacher", help="the frozen diffusion teacher: pretrain a small one, or fill the feature cache"
    )
    teacher.add_argument("action", choices=("pretrain", "extract"))
    teacher.add_argument(
        "overrides",
        nargs="*",
        help="pretrain: out=FOLDER minutes=N seed=N quiet=true ...; extract: split=public|train|val|test "
        "features=text,image,image_classes,latents,prompts plus the train config's keys (data.*, teacher.*, "
        "quiet=true)",
    )
    teacher.set_defaults(run=_teacher)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        return args.run(args)
    except Exception as error:
        if os.environ.get("MMFED_DEBUG"):
            raise  # the full traceback
        if isinstance(error, _user_errors()):
            print(f"mmfed: error: {_one_line(error)}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):  # a disk full, a read-only file: name the file
            from mmfed.federation.folder import describe_os_error

            print(f"mmfed: error: {describe_os_error(error)}", file=sys.stderr)
            return 2
        raise  # a bug rather than bad input: the traceback


if __name__ == "__main__":
    sys.exit(main())
