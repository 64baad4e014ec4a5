"""A federated training run, from a composed config to a run folder.

runs/<name>/
  config.yaml        the resolved config (what `resume=true` checks against)
  partition.json     the federation layout: client ids, kinds, sample ids
  metrics.jsonl      one JSON object per round
  summary.json       final test metrics (test/..., model chosen on validation; local/...: clients) and totals
  checkpoints/       last.pt every round (atomic), best.pt (global weights at the best validation round)
  client_state/      personal client state, per client per round
  plots/             PNG curves (regenerate with `mmfed report RUN_DIR`)
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import mmfed.algorithms  # noqa: F401  (registers loss terms and server steps)
from mmfed.algorithms.base import ServerStep
from mmfed.config import ConfigError, instantiate, to_container
from mmfed.console import CHANCE_PREFIX, bar_disabled
from mmfed.data.layout import CLIENT_KINDS, ClientSpec, FederationLayout, load_layout, save_layout
from mmfed.data.partition import Partitioner
from mmfed.data.samples import MultimodalSplit
from mmfed.evaluation import Evaluator, evaluate_protocol
from mmfed.federation.client import ClientApp, ClientData, LocalTraining, ModelPool
from mmfed.federation.embedded import ClientStateStore, EmbeddedEngine, resolve_workers
from mmfed.federation.folder import RunLock, check_run_dir
from mmfed.federation.server import COST_PREFIX, Engine, RoundTraffic, Server, add_metrics
from mmfed.loggers import open_loggers
from mmfed.metrics.chance import split_chance
from mmfed.models.multimodal import KIND_PARTS, MultimodalModel, build_model
from mmfed.utils.environment import describe_environment
from mmfed.utils.io import (
    TEST_PREFIX,
    CorruptFileError,
    dumps,
    load_torch,
    load_yaml,
    read_metrics_file,
    save_json,
    save_torch,
)
from mmfed.utils.seeding import numpy_rng, seed_torch

log = logging.getLogger("mmfed")
ENGINES = ("embedded", "flower")
# Which round's models the per-client evaluation pairs (config key `client_eval_round`):
#   best: the global model of the best validation round with each client's personal parts as of
#         that round (evaluated when the round becomes the best: the pair the run selected);
#   last: the last round's global model with the last round's personal parts.
CLIENT_EVAL_ROUNDS = ("best", "last")
# Relative training cost of one row per client kind, for the order in which worker processes take
# clients (largest first): the default federation's per-row training time by kind, measured by
# eval/profile_round.py on 2026-12-03 (paired 1.42, image 0.81, text 0.56 ms a row, bfloat16).
ROW_COST = {"image": 1.0, "text": 0.7, "paired": 1.75}


class RunError(RuntimeError):
    """The run folder is in a state the requested run cannot use (message says what to do)."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name!r} requested but no CUDA device is available")
    return torch.device(name)


def _rows(split: MultimodalSplit, ids: tuple[str, ...], cid: str) -> list[int]:
    index = {sample_id: row for row, sample_id in enumerate(split.ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise RunError(
            f"client {cid}: sample id {missing[0]!r} from the partition is not in split '{split.name}'"
        )
    return [index[i] for i in ids]


def _classes(nodes: Any) -> list[type]:
    from hydra.utils import get_class

    return [get_class(node._target_) for node in nodes]


def _uses_public(cfg: DictConfig) -> bool:
    """Whether any configured loss term or server step declares `uses_public` (read from its class)."""
    parts = _classes([*cfg.algorithm.loss_terms.values(), *cfg.algorithm.server_steps.values()])
    return any(getattr(part, "uses_public", False) for part in parts)


def global_parts(cfg: DictConfig) -> tuple[str, ...]:
    """The global model's parts: those some configured server step trains (declared by its class)."""
    trained = {part for step in _classes(cfg.algorithm.server_steps.values()) for part in step.trains_parts}
    return tuple(part for part in KIND_PARTS["global"] if part in trained)


class Federation:
    """What the config determines for server and clients alike: data, clients, models, local training.

    Deterministic from the config, so any process (the embedded run, a Flower SuperNode) rebuilds the
    same federation and the same client from `cfg` and a client id.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.seed = int(cfg.seed)
        self.device = _device(str(cfg.device))
        if cfg.get("threads") is not None:  # every process that builds the federation (a Flower node too)
            torch.set_num_threads(int(cfg.threads))
        self.world = instantiate(cfg.data, "data")
        self.num_image_classes = len(self.world.image_classes) or None
        self.num_text_classes = len(self.world.text_classes) or None
        layout: FederationLayout = instantiate(cfg.layout, "layout")
        partitioner: Partitioner = instantiate(cfg.partition, "partition")
        per_kind = cfg.get("partition_by_kind") or {}
        partitioners = {
            kind: instantiate(per_kind[kind], f"partition_by_kind.{kind}")
            if kind in per_kind
            else partitioner
            for kind in CLIENT_KINDS
        }
        if hasattr(self.world, "build_clients"):  # one dataset per client kind (data=composite)
            self.clients: list[ClientSpec] = self.world.build_clients(layout, partitioners, self.seed)
            self.train_splits = {kind: self.world.train_split(kind) for kind in self.world.kinds}
        else:  # one training split shared out among the kinds
            train = self.world.split("train")
            if per_kind:
                raise ConfigError(
                    "config key 'partition_by_kind' needs a data source with one split per kind "
                    "(data=composite); use 'partition' with a single source"
                )
            self.clients = layout.build(train, partitioner, numpy_rng(self.seed, "layout"))
            self.train_splits = dict.fromkeys(CLIENT_KINDS, train)
        self.training: LocalTraining = instantiate(cfg.training, "training")
        self._pool: ModelPool | None = None

    def split(self, name: str) -> MultimodalSplit:
        return self.world.split(name)

    def layout_meta(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "seed": self.seed,
            "partition": to_container(cfg.partition),
            "layout": to_container(cfg.layout),
            "data": to_container(cfg.data),
            "partition_by_kind": to_container(cfg.get("partition_by_kind") or {}),
        }

    def variant(self, spec: ClientSpec) -> int:
        """Which encoder variant a client uses: its index within its kind, cycling through the variants."""
        counts = [len(self.cfg.model.image_encoder_variants), len(self.cfg.model.text_encoder_variants)]
        return int(spec.cid.rsplit("-", 1)[1]) % max(1, *counts)

    def build_model(self, kind: str, variant: int = 0) -> MultimodalModel:
        """A client model of `kind` (encoders picked by `variant`), or the global model (kind "global")."""
        model_cfg = self.cfg.model
        encoders: dict[str, Any] = {}
        if kind != "global":
            for name in ("image_encoder", "text_encoder"):
                variants = model_cfg[f"{name}_variants"]
                if variants:
                    encoders[name] = variants[variant % len(variants)]
        model = build_model(
            model_cfg,
            KIND_PARTS[kind],
            self.num_image_classes,
            self.num_text_classes,
            fusion=kind != "global" and bool(model_cfg.fusion),
            **encoders,
        )
        if kind != "global" and model_cfg.get("lora") is not None:  # personal LoRA adapters (models/lora.py)
            model = instantiate(model_cfg.lora, "model.lora").wrap(model)
        return model

    def global_model(self) -> MultimodalModel:
        seed_torch(self.seed, "global-init")
        model = build_model(
            self.cfg.model, global_parts(self.cfg), self.num_image_classes, self.num_text_classes
        )
        return model.to(self.device)

    def _template(self, kind: str, variant: int) -> MultimodalModel:
        seed_torch(self.seed, "client-template", kind, variant)
        return self.build_model(kind, variant)

    @property
    def pool(self) -> ModelPool:
        if self._pool is None:
            self._pool = ModelPool(self._template, self.device)
        return self._pool

    @functools.cached_property
    def public(self) -> MultimodalSplit:
        return self.world.split("public")

    @functools.cached_property
    def uses_public(self) -> bool:
        return _uses_public(self.cfg)

    def spec(self, cid: str) -> ClientSpec:
        for client in self.clients:
            if client.cid == cid:
                return client
        raise KeyError(f"no client {cid!r} in this federation ({', '.join(c.cid for c in self.clients)})")

    def client_app(self, cid: str) -> ClientApp:
        """The client `cid` with its own rows of the training split (built on demand, not kept)."""
        spec = self.spec(cid)
        train = self.train_splits[spec.kind]
        split = train.subset(_rows(train, spec.train_ids, spec.cid), name=spec.cid)
        test = train.subset(_rows(train, spec.test_ids, spec.cid), name=f"{spec.cid}-test")
        return ClientApp(
            spec,
            ClientData(split, spec.kind, spec.missing_image, spec.missing_text),
            self.pool,
            self.cfg.algorithm.loss_terms,
            self.training,
            self.seed,
            variant=self.variant(spec),
            public=self.public if self.uses_public else None,
            test_data=test,
            evaluator=self.evaluator,
            client_tasks=self.cfg.algorithm.get("client_tasks"),
            quiet=bool(self.cfg.get("quiet", False)),
        )

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        return instantiate(self.cfg.evaluation, "evaluation")


class Run:
    """One training run in its folder: the federation, the server, an engine; `train()` runs the rounds."""

    def __init__(self, cfg: DictConfig, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self.seed = int(cfg.seed)
        self.dir = Path(cfg.run_dir)
        self.quiet = bool(cfg.quiet)
        if engine is None and cfg.engine not in ENGINES:
            raise ConfigError(f"config key 'engine': {cfg.engine!r} is not one of {', '.join(ENGINES)}")
        check_run_dir(self.dir)  # nothing is written before every check has passed (see _claim_folder)
        self.federation = Federation(cfg)
        self.clients = self.federation.clients
        self.val_split = self.federation.split("val")
        self.test_split = self.federation.split("test")
        self.global_model = self.federation.global_model()
        steps: dict[str, ServerStep] = {
            name: instantiate(step_cfg, f"algorithm.server_steps.{name}")
            for name, step_cfg in cfg.algorithm.server_steps.items()
        }
        self.server = Server(
            self.global_model,
            steps,
            self.clients,
            self.seed,
            cfg.clients_per_round,
            public=self.federation.public if self.federation.uses_public else None,
            min_replies=cfg.min_replies,
        )
        self.evaluator: Evaluator = instantiate(cfg.evaluation, "evaluation")
        self.client_eval_round = str(cfg.get("client_eval_round", "best"))
        if self.client_eval_round not in CLIENT_EVAL_ROUNDS:
            raise ConfigError(
                f"config key 'client_eval_round': {self.client_eval_round!r} is not one of "
                f"{', '.join(CLIENT_EVAL_ROUNDS)}"
            )
        self.store = ClientStateStore(self.dir / "client_state")
        if engine is None and cfg.engine == "flower":  # clients on Flower: see mmfed.federation.flower
            from mmfed.federation.flower.engine import FlowerEngine

            engine = FlowerEngine.from_config(cfg)
        if engine is None:
            factories = {c.cid: (lambda cid=c.cid: self.federation.client_app(cid)) for c in self.clients}
            workers = min(resolve_workers(cfg.get("workers", 1)), len(self.clients))  # no idle worker
            engine = EmbeddedEngine(
                factories,
                self.store,
                quiet=self.quiet,
                client_timeout=cfg.client_timeout,
                workers=workers,
                worker_threads=max(1, torch.get_num_threads() // workers),  # `threads` in all
                costs={c.cid: c.num_examples * ROW_COST.get(c.kind, 1.0) for c in self.clients},
            )
        self.engine = engine
        self._claim_folder()

    # ------------------------------------------------------------------ setup
    def _claim_folder(self) -> None:
        """Lock the run folder, check it under the lock, clean a killed write's temp files, then write
        config.yaml and partition.json; the lock is held until `train` returns (or this fails)."""
        self.lock = RunLock(self.dir).acquire()
        try:
            self._check_folder()
            layout_file, meta = self._check_layout()
            self.lock.clean()
            (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            if layout_file is not None:
                save_layout(self.clients, layout_file, meta)
        except BaseException:
            self.lock.release()
            raise

    def _check_folder(self) -> None:
        config_file = self.dir / "config.yaml"
        if self.cfg.resume:
            if not config_file.exists():
                raise RunError(
                    f"resume=true but {config_file} does not exist; give the name of an existing run"
                )
            saved = load_run_config(config_file)
            # the folder is the identity; these only say where output goes
            ignore = {"resume", "quiet", "rounds", "name", "run_dir", "logger", "wandb_project", "sweep_dir"}
            changed = [
                k
                for k in set(saved) | set(self.cfg)
                if k not in ignore and OmegaConf.to_container(saved).get(k) != to_container(self.cfg).get(k)
            ]
            if changed:
                raise RunError(
                    f"resume=true but config key '{sorted(changed)[0]}' differs from {config_file}; "
                    "resume with the same config (only rounds, quiet may change)"
                )
            last, metrics_file = self.dir / "checkpoints" / "last.pt", self.dir / "metrics.jsonl"
            if last.exists():  # what `train` will read: damaged is an error now, before any write
                load_checkpoint(last, RESUME_KEYS, RESUME_ADVICE)
                if metrics_file.exists():
                    read_metrics(metrics_file)
        elif (self.dir / "checkpoints").exists():
            raise RunError(
                f"run folder {self.dir} already holds a run; pass resume=true to continue it or "
                "choose another name=..."
            )

    def _check_layout(self) -> tuple[Path | None, dict[str, Any]]:
        """(where to write partition.json, or None when the saved one matches; its meta)."""
        path = self.dir / "partition.json"
        meta = self.federation.layout_meta()
        if not path.exists():
            return path, meta
        advice = "delete it (it is recomputed from the config) or start a new run name"
        try:
            saved, saved_meta = load_layout(path)
        except CorruptFileError as error:
            raise CorruptFileError(f"{str(error).split('; ')[0]}; {advice}") from error
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise CorruptFileError(
                f"partition file {path} does not hold a partition ({type(error).__name__}: {error}); {advice}"
            ) from error
        if saved != self.clients or saved_meta != meta:
            raise RunError(
                f"{path} does not match the partition this config makes (a stale partition is "
                "never reused); start a new run name"
            )
        return None, meta

    # ------------------------------------------------------------------ rounds
    def train(self) -> dict[str, Any]:
        rounds = int(self.cfg.rounds)
        start, best, history_seconds, totals = (
            1,
            {"round": 0, "score": float("-inf")},
            0.0,
            {"up": 0, "down": 0},
        )
        last = self.dir / "checkpoints" / "last.pt"
        metrics_file = self.dir / "metrics.jsonl"
        if self.cfg.resume and last.exists():
            checkpoint = load_checkpoint(last, RESUME_KEYS, RESUME_ADVICE)
            self.global_model.load_state_dict(checkpoint["global"])
            self.server.load_state_dict(checkpoint["server"])
            start, best, history_seconds, totals = (
                checkpoint["round"] + 1,
                checkpoint["best"],
                checkpoint["wall_seconds"],
                checkpoint["bytes"],
            )
            self.store.rollback(checkpoint["round"])
            kept = [
                record
                for record in (read_metrics(metrics_file) if metrics_file.exists() else [])
                if record["round"] <= checkpoint["round"]
            ]
            metrics_file.write_text("".join(dumps(record) + "\n" for record in kept))
            log.info("resuming %s after round %d", self.dir, checkpoint["round"])
        elif not self.cfg.resume:
            metrics_file.write_text("")
        else:
            self.store.rollback(0)
            metrics_file.write_text("")

        loggers = open_loggers(self.cfg, self.dir, start)  # logger=tensorboard|wandb (mmfed/loggers.py)
        prepared = self._prepare() if self.server.prepares and start == 1 else None
        if prepared is not None:
            history_seconds += prepared["seconds"]
        bar = tqdm(
            range(start, rounds + 1),
            desc="rounds",
            unit="round",
            disable=bar_disabled(not self.quiet),
            initial=start - 1,
            total=rounds,
        )
        for round_ in bar:
            began = time.perf_counter()
            server_metrics, traffic, replies = self.server.run_round(round_, self.engine)
            val = self.evaluator.evaluate(self.global_model, self.val_split)
            self.server.observe(round_, {f"val/{k}": v for k, v in val.items()})
            seconds = time.perf_counter() - began
            first = prepared if round_ == 1 else None  # round 1's record carries the prepare stage
            if first is not None:
                server_metrics = _with_prepare(server_metrics, traffic, first)
            history_seconds += seconds
            totals["up"] += traffic.bytes_up
            totals["down"] += traffic.bytes_down
            record: dict[str, Any] = {
                "round": round_,
                "wall_seconds": round(seconds, 3),
                "bytes_up": traffic.bytes_up,
                "bytes_down": traffic.bytes_down,
            }
            if first is not None:
                record["prepare_seconds"] = round(first["seconds"], 3)
            record.update(_train_means(replies))
            record.update(server_metrics)
            record.update({f"val/{k}": v for k, v in val.items()})
            record["clients_bytes"] = traffic.per_client
            failures = getattr(self.engine, "failures", [])
            record["failures"] = [f.as_dict() for f in failures if f.round == round_]
            record["failures"] += first["failures"] if first is not None else []
            score = val.get(self.evaluator.selection_metric)
            if score is None:
                raise ConfigError(
                    f"config key 'evaluation.selection_metric': {self.evaluator.selection_metric!r} is "
                    f"not among the validation metrics ({', '.join(sorted(val))})"
                )
            if score > best["score"]:
                best = {"round": round_, "score": score}
                save_torch(self.global_model.state_dict(), self.dir / "checkpoints" / "best.pt")
                if self.client_eval_round == "best" and self._client_eval_deferrable():
                    best["deferred"] = True  # evaluated once, in `finish`, from best.pt: the same pair
                elif self.client_eval_round == "best":  # the pair belongs to this round: evaluate it now
                    best["clients"] = self._evaluate_clients(round_)
            with metrics_file.open("a") as handle:
                handle.write(dumps(record) + "\n")
            loggers.log(record, round_)
            save_torch(
                {
                    "round": round_,
                    "global": self.global_model.state_dict(),
                    "server": self.server.state_dict(),
                    "best": best,
                    "wall_seconds": history_seconds,
                    "bytes": totals,
                },
                last,
            )
            self.store.rollback(round_)
            bar.set_postfix_str(f"val {self.evaluator.selection_metric}={score:.2f}")
            log.info(
                "round %d/%d  val %s=%.2f  (%.1f s)",
                round_,
                rounds,
                self.evaluator.selection_metric,
                score,
                seconds,
            )
        loggers.close()
        return self.finish(rounds, best, history_seconds, totals)

    def _prepare(self) -> dict[str, Any]:
        """The one-time prepare stage, or (resuming a run that did it) what it left.

        `checkpoints/prepared.pt` keeps the server steps' state right after the stage (e.g. the
        sampled auxiliary data) with its metrics, traffic and time, so a run interrupted in round 1
        neither retrains the clients' models nor resamples; round 1's record still reports them.
        """
        path = self.dir / "checkpoints" / "prepared.pt"
        if self.cfg.resume and path.exists():
            saved = load_checkpoint(path, ("server", "record"), RESUME_ADVICE)
            self.server.load_state_dict(saved["server"])
            log.info("prepare stage: reusing %s", path)
            return saved["record"]
        began = time.perf_counter()
        metrics, traffic = self.server.prepare(self.engine)
        failures = getattr(self.engine, "failures", [])
        record = {
            "metrics": metrics,
            "per_client": traffic.per_client,
            "seconds": time.perf_counter() - began,
            "failures": [f.as_dict() for f in failures if f.round == 0],
        }
        save_torch({"server": self.server.state_dict(), "record": record}, path)
        self.store.rollback(0)
        return record

    def _client_eval_deferrable(self) -> bool:
        """Whether the clients' evaluation of this round can wait for the end of training and give the
        same numbers: no client holds personal state (so their models are the global model alone) and
        every server step's evaluate payload depends only on the global model, which best.pt keeps.
        Skips the evaluations of best rounds that a later round beats. Only the embedded engine can
        tell that its clients hold no state (under Flower it lives on the nodes): others evaluate now."""
        store = getattr(self.engine, "store", None)
        return isinstance(store, ClientStateStore) and store.empty() and self.server.evaluate_from_global

    def _evaluate_clients(self, after_round: int) -> dict[str, dict[str, float]]:
        """Every client on its local test split, with the model it has after `after_round`: the
        global model as it is now plus its personal parts as of that round (fusion, heads,
        adapters: the state it saved last by then). Evaluation changes no client state."""
        per_client = self.server.evaluate_clients(after_round + 1, self.engine)
        self.store.rollback(after_round)
        return per_client

    def finish(
        self, rounds: int, best: dict[str, Any], seconds: float, totals: dict[str, int]
    ) -> dict[str, Any]:
        """Test metrics of the model chosen on validation: the only time the test split is used
        (per client: the local test splits, at the round `client_eval_round` names)."""
        best_file = self.dir / "checkpoints" / "best.pt"
        if self.client_eval_round == "last":  # before the best round's global model is loaded
            per_client, clients_round = self._evaluate_clients(rounds), rounds
        elif "clients" in best:
            per_client, clients_round = best["clients"], best["round"]
        elif not best.get("deferred"):
            raise RunError(
                f"{self.dir}: checkpoints/last.pt has no per-client metrics of the best round "
                "(written by an older mmfed); start a new run name"
            )
        if best_file.exists():
            self.global_model.load_state_dict(load_checkpoint(best_file, advice=RESUME_ADVICE))
        if self.client_eval_round == "best" and best.get("deferred"):
            # Stateless clients: the global model of the best round is the model each client had then.
            per_client = self.server.evaluate_clients(best["round"] + 1, self.engine)
            clients_round = best["round"]
        test = self.evaluator.evaluate(self.global_model, self.test_split)
        summary: dict[str, Any] = {TEST_PREFIX + k: v for k, v in test.items()}  # beside val/..., local/...
        chance = split_chance(self.test_split, self.evaluator.ks)  # the floor each test metric sits on
        summary.update({CHANCE_PREFIX + k: v for k, v in chance.items() if k in test})
        world = self.federation.world
        for name in getattr(world, "protocols", {}):  # composite data: every named test protocol
            heads = self.global_model.has("image_head") or self.global_model.has("text_head")
            if world.protocols[name].task != "retrieval" and not heads:
                summary[f"test/{name}/skipped"] = (
                    "the global model has no classification head (see local/...)"
                )
                continue
            result = evaluate_protocol(
                self.global_model,
                world.protocols[name],
                world.protocol_split(name),
                ks=self.evaluator.ks,
                chunk_size=self.evaluator.chunk_size,
                backend=self.evaluator.backend,
            )
            summary.update({f"test/{name}/{k}": v for k, v in result["metrics"].items()})
        summary.update(getattr(world, "data_metrics", dict)())  # e.g. corrupt images skipped, per split
        # Per client: the model it would use (global parts + its personal parts) on its local test split.
        summary.update(_client_summary(per_client, self.clients))
        summary["clients"] = per_client
        failures = getattr(self.engine, "failures", [])  # clients missing from `clients`, and why
        summary["client_eval_failures"] = [
            f.as_dict() for f in failures if f.stage == "evaluate" and f.round == clients_round + 1
        ]
        summary.update(
            {
                "rounds": rounds,
                "best_round": best["round"],
                "client_eval_round": self.client_eval_round,
                "clients_round": clients_round,
                "selection_metric": self.evaluator.selection_metric,
                f"val/{self.evaluator.selection_metric}": best["score"],
                "wall_seconds": round(seconds, 3),
                "bytes_up": totals["up"],
                "bytes_down": totals["down"],
            }
        )
        summary.update(_cost_totals(self.dir / "metrics.jsonl"))
        summary["environment"] = describe_environment()  # threads and CPU kernels change the numbers too
        save_json(summary, self.dir / "summary.json")
        from mmfed.report import plot_run

        plot_run(self.dir)
        return summary


def _client_summary(per_client: dict[str, dict[str, float]], clients: list[ClientSpec]) -> dict[str, float]:
    """Mean and std over the clients of each kind, e.g. ``local/image/classification/image/acc/mean``."""
    summary: dict[str, float] = {}
    for kind in ("image", "text", "paired"):
        rows = [per_client[c.cid] for c in clients if c.kind == kind and c.cid in per_client]
        for key in sorted({k for row in rows for k in row}):
            values = torch.tensor([row[key] for row in rows if key in row], dtype=torch.float64)
            name = f"local/{kind}/{key.removeprefix('local/')}"
            summary[f"{name}/mean"] = float(values.mean())
            summary[f"{name}/std"] = float(values.std(unbiased=False))
    return summary


def _with_prepare(
    metrics: dict[str, float], traffic: RoundTraffic, prepared: dict[str, Any]
) -> dict[str, float]:
    """Round 1's metrics and traffic (in place) plus the prepare stage's (cost/... summed)."""
    merged = dict(metrics)
    add_metrics(merged, prepared["metrics"], "")
    for cid, entry in prepared["per_client"].items():
        mine = traffic.per_client.setdefault(cid, {"down": 0, "up": 0})
        mine["down"] += entry["down"]
        mine["up"] += entry["up"]
    traffic.bytes_down = sum(e["down"] for e in traffic.per_client.values())
    traffic.bytes_up = sum(e["up"] for e in traffic.per_client.values())
    return merged


def _cost_totals(metrics_file: Path) -> dict[str, float]:
    """Every ``cost/...`` metric summed over the rounds in metrics.jsonl (the run's total cost)."""
    totals: dict[str, float] = {}
    for record in read_metrics(metrics_file):
        for key, value in record.items():
            if key.startswith(COST_PREFIX):
                totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def _train_means(replies: list[Any]) -> dict[str, float]:
    """Mean of each client training metric over the clients that reported it, also per kind."""
    sums: dict[str, list[float]] = {}
    for reply in replies:
        for key, value in reply.metrics.items():
            sums.setdefault(key, []).append(value)
            sums.setdefault(f"{key.replace('train/', f'train/{reply.kind}/', 1)}", []).append(value)
    return {key: sum(values) / len(values) for key, values in sums.items()}


RESUME_KEYS = ("round", "global", "server", "best", "wall_seconds", "bytes")
RESUME_ADVICE = (
    "delete checkpoints/ and metrics.jsonl to restart this run from round 1, or start another name=..."
)


def load_checkpoint(path: Path, keys: tuple[str, ...] = (), advice: str = RESUME_ADVICE) -> Any:
    """A checkpoint of this run; unreadable, or a dict without `keys`, is one line naming the file."""
    checkpoint = load_torch(path, "checkpoint", advice)
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing or not isinstance(checkpoint, dict):
        raise CorruptFileError(
            f"checkpoint {path} is not a checkpoint of this run (no {missing[0] if missing else 'state'!r}); "
            f"{advice}"
        )
    return checkpoint


RUN_CONFIG_KEYS = ("seed", "data", "partition", "layout", "model", "training", "algorithm", "evaluation")


def load_run_config(path: Path) -> DictConfig:
    """A run folder's config.yaml; unreadable or lacking a run's keys is one line naming the file."""
    cfg = load_yaml(path)
    missing = [key for key in RUN_CONFIG_KEYS if key not in cfg]
    if missing:
        raise CorruptFileError(
            f"config file {path} is not an mmfed run config (no key {missing[0]!r}); restore it from the "
            "run that wrote it or start a new run name"
        )
    return cfg


def load_global_weights(path: Path, model: MultimodalModel, config_file: Path) -> None:
    """Load a run's global weights (best.pt, or last.pt's ``global``) into `model`; a damaged file or
    one from another config is one line naming the file (`mmfed eval`, `mmfed personalize`)."""
    advice = "pass checkpoint=last (or best), or train the run again"
    state = load_torch(path, "checkpoint", advice)
    if isinstance(state, dict) and "global" in state and "round" in state:  # last.pt holds more than weights
        state = state["global"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(f"checkpoint {path} does not hold model weights; {advice}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as error:
        why = " ".join(str(error).split())[:240]
        raise CorruptFileError(
            f"checkpoint {path} does not fit the model of {config_file} ({why}); "
            "pass the checkpoint this run wrote (checkpoint=best|last)"
        ) from error


read_metrics = read_metrics_file  # the run's metrics.jsonl reader (kept under its old name)


def train(cfg: DictConfig) -> dict[str, Any]:
    """An embedded run (``engine=embedded``); `mmfed.federation.launch.train` chooses any engine."""
    if cfg.engine != "embedded":
        raise ConfigError(
            f"config key 'engine': federation.run.train runs engine=embedded; engine={cfg.engine} runs "
            "through mmfed.federation.launch.train (what `mmfed train` calls)"
        )
    run = Run(cfg)
    try:
        return run.train()
    finally:
        run.lock.release()
