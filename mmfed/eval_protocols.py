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

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mmfed.config import ConfigError, instantiate, node_for, registered
from mmfed.console import bar_disabled
from mmfed.data.samples import MultimodalSplit
from mmfed.data.sources.base import DataNotFoundError
from mmfed.data.sources.protocols import Protocol, get_protocol
from mmfed.utils.io import load_torch, save_json

CHECKPOINTS = ("best", "last")
OPTIONS = ("protocol", "checkpoint", "fold_size", "batch_size", "backend", "device", "quiet")


@torch.no_grad()
def encode(
    model: Any, split: MultimodalSplit, batch_size: int = 256, progress: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(image embeddings [N, D] | None, caption embeddings [M, D] | None, caption -> row, caption label).

    Images are decoded a batch at a time (`split.images[i : i + batch_size]`), so a lazy column is
    never decoded whole; the bars show encoding progress.
    """
    image_emb = text_emb = None
    if split.images is not None and model.has("image_encoder"):
        starts = range(0, len(split), batch_size)
        bar = tqdm(starts, desc=f"encoding {split.name} images", unit="batch", disable=bar_disabled(progress))
        image_emb = torch.cat(
            [model.encode_images(split.images[i : i + batch_size]).float().cpu() for i in bar]
        )
    rows = labels = torch.zeros(0, dtype=torch.int64)
    if split.captions is not None and model.has("text_encoder"):
        texts, rows, labels = split.flat_captions()
        starts = range(0, len(texts), batch_size)
        bar = tqdm(
            starts, desc=f"encoding {split.name} captions", unit="batch", disable=bar_disabled(progress)
        )
        text_emb = torch.cat([model.encode_texts(texts[i : i + batch_size]).float().cpu() for i in bar])
    return image_emb, text_emb, rows, labels


def _accuracy(
    model: Any, head: str, emb: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str
) -> float:
    """Top-1 accuracy of `head` on `emb`; a head trained for another class count is an error."""
    from mmfed.metrics import classification_accuracy

    layer = getattr(model, head)
    if layer.out_features != len(classes):
        raise ValueError(
            f"protocol {name}: the model's {head} predicts {layer.out_features} classes, the dataset has "
            f"{len(classes)}; evaluate a run trained on this dataset"
        )
    return classification_accuracy(layer(emb.to(model.device)).cpu(), labels, len(classes))


def evaluate_protocol(
    model: Any,
    protocol: Protocol,
    split: MultimodalSplit,
    *,
    batch_size: int = 256,
    fold_size: int | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 256,
    backend: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of `model` on `split` under `protocol`, plus the sizes they were computed on.

    Keys are flat as in summary.json: ``retrieval/i2t/R@1`` ... ``retrieval/rsum``,
    ``retrieval/rsum@1``, ``classification/image/acc`` / ``classification/text/acc``. For a folded
    protocol (``fold_size``, 1,000 for coco-1k unless overridden) the retrieval keys are the means
    over the folds; images past the last whole fold are left out (and counted).
    """
    was_training = model.training
    model.eval()
    try:
        image_emb, text_emb, rows, labels = encode(model, split, batch_size, progress)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"images": len(split), "captions": int(rows.numel())}
    metrics: dict[str, float] = {}
    if protocol.task == "retrieval":
        if image_emb is None or text_emb is None:
            raise ValueError(
                f"protocol {protocol.name} needs images and captions and a model with both encoders; "
                f"split '{split.name}' / the model lack one"
            )
        folds = fold_size or protocol.fold_size
        n = image_emb.shape[0]
        if folds is not None and n < 2 * folds:
            raise ValueError(
                f"protocol {protocol.name}: split '{split.name}' has {n} images, fewer than two folds of "
                f"fold_size={folds}; use a smaller fold_size"
            )
        from mmfed.metrics import retrieval_protocol  # torchmetrics: seconds, so only once data is there

        scores = retrieval_protocol(
            image_emb, text_emb, rows, ks=ks, fold_size=folds or n + 1, chunk_size=chunk_size, backend=backend
        )
        prefix = "1k/" if folds is not None else ""
        metrics.update(
            {f"retrieval/{k[len(prefix) :]}": v for k, v in scores.items() if k.startswith(prefix)}
        )
        if folds is not None:
            out.update(fold_size=folds, folds=n // folds, images_left_out=n - (n // folds) * folds)
    else:
        if image_emb is not None and split.image_labels is not None and model.has("image_head"):
            acc = _accuracy(
                model, "image_head", image_emb, split.image_labels, split.image_classes, protocol.name
            )
            metrics["classification/image/acc"] = acc
        if text_emb is not None and split.text_labels is not None and model.has("text_head"):
            metrics["classification/text/acc"] = _accuracy(
                model, "text_head", text_emb, labels, split.text_classes, protocol.name
            )
        if not metrics:
            raise ValueError(
                f"protocol {protocol.name}: the model has no head for split '{split.name}' "
                "(an image_head for image labels, a text_head for text labels)"
            )
    out["metrics"] = metrics
    return out


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
    options, data_overrides = parse_options(tokens)
    protocol = get_protocol(options["protocol"])
    run = Path(run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: RUN_DIR must be a run folder written by mmfed train"
        )
    cfg = OmegaConf.load(config_file)
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

    from mmfed.federation.run import Federation  # seconds of imports: only once the data is there

    model = Federation(cfg).global_model()
    state = load_torch(path)
    if isinstance(state, dict) and "global" in state and "round" in state:  # last.pt holds more than weights
        state = state["global"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as error:
        raise ValueError(
            f"checkpoint {path} does not fit the model of {config_file}: {str(error).splitlines()[0]}"
        ) from error

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
