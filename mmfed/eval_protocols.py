"""Evaluating a trained run on a named protocol: ``mmfed eval RUN_DIR protocol=coco-1k``.

Protocols (`mmfed.data.sources.protocols.PROTOCOLS`): ``coco-1k`` (COCO 5K test in five folds of
1,000 images / 5,000 captions, averaged), ``coco-5k`` (5,000 images x 25,000 captions),
``flickr30k-1k`` (Flickr30k test, 1,000 x 5,000), and test accuracy on ``cifar10``, ``cifar100``,
``tiny_imagenet``, ``agnews``. Retrieval reports R@1/5/10 both ways, RSum and RSum@1 (i2t R@1 +
t2i R@1), with the pessimistic tie rule and the chunked/faiss search of `mmfed.metrics.retrieval`
(COCO-5K: seconds on a CPU); classification reports top-1 accuracy of the model's heads.

The model is rebuilt exactly as the run built it (``Federation(cfg).global_model()`` from
``RUN_DIR/config.yaml``) and loaded from ``checkpoints/best.pt`` (the model chosen on validation);
the protocol's data come from the run's own data config when it holds that dataset (the same
source, or a composite's member), else from the dataset's registered defaults
(``$MMFED_DATA_DIR/<dataset>``), and ``data.<key>=value`` overrides any of its keys.
Results go to ``RUN_DIR/eval/<protocol>.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmfed.config import ConfigError, instantiate, node_for, registered
from mmfed.data.sources.base import DataNotFoundError
from mmfed.data.sources.protocols import Protocol, get_protocol
from mmfed.evaluation import encode, evaluate_protocol  # noqa: F401  (this module's API too)
from mmfed.utils.io import save_json

CHECKPOINTS = ("best", "last")
OPTIONS = ("protocol", "checkpoint", "fold_size", "batch_size", "backend", "device", "quiet")


def _target(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def protocol_data_config(data: DictConfig, protocol: Protocol) -> DictConfig:
    """The data config of `protocol`'s dataset: the run's own when it holds that dataset, else defaults.

    Always typed by the dataset's structured config, so an override of an unknown key or with a
    wrong type fails naming the key.
    """
    sources = registered("data")
    if protocol.dataset not in sources:
        raise ValueError(
            f"protocol {protocol.name}: dataset {protocol.dataset!r} is not a registered data source"
        )
    target = _target(sources[protocol.dataset])
    candidates = [data]
    if data.get("_target_") == _target(sources["composite"]):
        eval_data = data.get("eval_data") or {}
        if protocol.dataset in eval_data:
            return OmegaConf.merge(
                OmegaConf.structured(node_for(sources[protocol.dataset])), eval_data[protocol.dataset]
            )
        candidates = [
            data[role] for role in ("image", "text", "paired", "public") if data.get(role) is not None
        ]
    schema = OmegaConf.structured(node_for(sources[protocol.dataset]))  # types and defaults of every key
    for node in candidates:
        if node.get("_target_") == target:
            return OmegaConf.merge(schema, node)
    return schema


def parse_options(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """(``key=value`` options of the eval command, ``data.<key>=value`` overrides)."""
    options: dict[str, str] = {}
    data: list[str] = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {token!r}")
        if key.startswith("data."):
            data.append(f"{key.removeprefix('data.')}={value}")
        elif key in OPTIONS:
            options[key] = value
        else:
            raise ConfigError(
                f"unknown option {key!r}; expected one of {', '.join(OPTIONS)} or data.<key>=..."
            )
    if "protocol" not in options:
        raise ConfigError("missing protocol=...; one of " + ", ".join(_protocol_names()))
    return options, data


def _protocol_names() -> list[str]:
    from mmfed.data.sources.protocols import PROTOCOLS

    return list(PROTOCOLS)


def _int(options: dict[str, str], key: str) -> int | None:
    if key not in options:
        return None
    value = options[key]
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{key}={value!r} must be an int >= 1")
    return int(value)


def evaluate_run(run_dir: str | Path, tokens: list[str]) -> dict[str, Any]:
    """``mmfed eval``: evaluate RUN_DIR's checkpoint on a protocol, save and return the result."""
    from mmfed.federation.run import Federation, load_global_weights, load_run_config

    options, data_overrides = parse_options(tokens)
    protocol = get_protocol(options["protocol"])
    run = Path(run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: RUN_DIR must be a run folder written by mmfed train"
        )
    cfg = load_run_config(config_file)
    if "device" in options:
        cfg.device = options["device"]
    checkpoint = options.get("checkpoint", "best")
    path = run / "checkpoints" / f"{checkpoint}.pt" if checkpoint in CHECKPOINTS else Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (checkpoint=best|last|<path>)")

    source_cfg = protocol_data_config(cfg.data, protocol)
    if data_overrides:
        try:
            source_cfg = OmegaConf.merge(source_cfg, OmegaConf.from_dotlist(data_overrides))
        except Exception as error:  # OmegaConf names the bad key and value
            raise ConfigError(f"data override {data_overrides}: {' '.join(str(error).split())}") from error
    try:
        split = instantiate(source_cfg, "data").split(protocol.split)
    except DataNotFoundError as error:  # advise this very command, with the option that points at the data
        raise error.under(command=f"mmfed eval {run_dir} protocol={protocol.name}") from None

    model = Federation(cfg).global_model()
    load_global_weights(path, model, config_file)

    evaluation = cfg.get("evaluation") or {}
    began = time.perf_counter()
    result = evaluate_protocol(
        model,
        protocol,
        split,
        batch_size=_int(options, "batch_size") or int(evaluation.get("batch_size", 256)),
        fold_size=_int(options, "fold_size"),
        ks=tuple(evaluation.get("ks", (1, 5, 10))),
        chunk_size=int(evaluation.get("chunk_size", 256)),
        backend=options.get("backend", str(evaluation.get("backend", "auto"))),
        progress=options.get("quiet", "false").lower() not in ("1", "true", "yes"),
    )
    result = {
        "protocol": protocol.name,
        "description": protocol.description,
        "dataset": protocol.dataset,
        "split": protocol.split,
        "checkpoint": str(path),
        **result,
        "seconds": round(time.perf_counter() - began, 3),
    }
    save_json(result, run / "eval" / f"{protocol.name}.json")
    return result


def format_result(result: dict[str, Any]) -> str:
    """A small table of the metrics, for the terminal."""
    lines = [f"{result['protocol']} ({result['dataset']} {result['split']}: {result['images']} images, "
             f"{result['captions']} captions)"]  # fmt: skip
    if "folds" in result:
        lines[0] += f", {result['folds']} folds of {result['fold_size']}"
    width = max((len(k) for k in result["metrics"]), default=0)
    lines += [f"  {key:<{width}}  {value:7.2f}" for key, value in result["metrics"].items()]
    return "\n".join(lines)
