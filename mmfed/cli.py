"""The `mmfed` command: ``mmfed train [key=value ...]``, ``mmfed report RUN_DIR``,
``mmfed eval RUN_DIR protocol=NAME``, ``mmfed personalize RUN_DIR``, ``mmfed teacher pretrain|extract``.

Configs are composed with Hydra's compose API from ``configs/`` (the repository's, or --config-dir)
plus the structured configs every component registers. Any error in the config or the input is
reported as one line naming the bad key, value or file, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_dir(explicit: str | None = None) -> Path:
    for candidate in (explicit, os.environ.get("MMFED_CONFIG_DIR"), REPO_CONFIGS, Path.cwd() / "configs"):
        if candidate and (Path(candidate) / "config.yaml").exists():
            return Path(candidate).resolve()
    raise FileNotFoundError("no configs/config.yaml found: pass --config-dir or set MMFED_CONFIG_DIR")


def compose(overrides: list[str], config_path: str | None = None) -> DictConfig:
    """Compose the config with overrides; unknown keys and bad values become one-line errors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    import mmfed.algorithms  # noqa: F401  (register every component's structured config)
    import mmfed.data.synthetic  # noqa: F401
    import mmfed.evaluation  # noqa: F401
    import mmfed.federation.client  # noqa: F401
    import mmfed.federation.flower.settings  # noqa: F401  (the `flower` group; no flwr import)
    import mmfed.models.encoders  # noqa: F401
    import mmfed.teacher.model  # noqa: F401  (the `teacher` group)
    from mmfed.config import ConfigError

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir(config_path)), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from error


def _one_line(error: BaseException) -> str:
    """The most specific message in the exception chain, on one line, naming the config key if known."""
    from omegaconf.errors import OmegaConfBaseException

    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:  # OmegaConf knows the full key of a bad value: say it
        key = getattr(item, "full_key", None)
        if isinstance(item, OmegaConfBaseException) and key and "$" not in str(item):
            text = " ".join(str(item).split("full_key:")[0].split())
            return f"config key '{key}': {text}"
    for item in chain:
        text = " ".join(str(item).split())
        if text and "$VALUE" not in text:
            return text.split(" Config search path:")[0]
    return type(error).__name__


def _train(args: argparse.Namespace) -> int:
    from mmfed.console import configure_progress, format_summary
    from mmfed.federation.run import train
    from mmfed.resume import resume_config

    began = time.perf_counter()
    # resume=true: the run folder's saved config (overrides that differ from it are an error)
    cfg = resume_config(args.overrides, lambda overrides: compose(overrides, args.config_dir))
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

        print(format_summary(json.loads(summary.read_text()), args.run_dir))
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


def _show(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(compose(args.overrides, args.config_dir)))
    return 0


_USER_ERRORS = (  # bad input, not a bug: one line and exit 2 ("module:class")
    "mmfed.config:ConfigError",
    "mmfed.federation.run:RunError",
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
    train.set_defaults(run=_train)
    show = commands.add_parser("config", help="print the composed config for these overrides")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(run=_show)
    report = commands.add_parser("report", help="(re)draw a run's plots and print its summary")
    report.add_argument("run_dir")
    report.set_defaults(run=_report)
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
        if not isinstance(error, _user_errors()) or os.environ.get("MMFED_DEBUG"):
            raise  # the full traceback, for bugs rather than bad input
        print(f"mmfed: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
