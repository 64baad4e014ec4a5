"""The teacher's features, mapped into the clients' shared latent space (dimension D).

Two maps, fitted once by the server (on the public split, or from client moments) and shipped to
clients as matrices:
- **text**: PCA of the teacher text encoder's pooled embeddings of the public captions (and the class
  prompts), to D dimensions;
- **image**: U-Net decoder features (pooled per block, concatenated), VAE latents, or both
  (``image_source``), mapped into D by one of
  * ``image_reduction=ridge`` (the step's default; SemanticFL): ridge regression onto the text PCA of
    each public image's captions, so a teacher image feature and the teacher feature of its caption
    land near each other, and aligning image encoders to image features and text encoders to text
    features pulls both towards one shared space instead of two unrelated PCA bases;
  * ``image_reduction=layer_pca`` (FedDifRC's paper, its algorithm config's default): each decoder
    layer reduced by its own PCA (``layer_components``; default D/2, D/4, D/4, the reference code's
    256 / 128 / 128 at D = 512), concatenated (`reduce.fit_layer_pca`); needs no captions;
  * ``image_reduction=pca``: one PCA of all the image features.

Without public data (FedDifRC's CIFAR-10 benchmark) `ClientTeacherSpace` fits the per-layer PCA in a
one-time prepare stage from the sum of the clients' own feature moments (client task
`TeacherMoments`: a count, column sums, per-layer outer-product sums; no image or per-sample feature
leaves a client) and the text map from the class prompts.

The maps are part of the step's state (saved in every checkpoint of the run) and are never refitted:
a resumed run loads them. Clients read them with `TeacherView`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.nn.functional as F

from mmfed.algorithms.base import ClientRound, ClientTask, ServerRound, ServerStep
from mmfed.config import ConfigError, check_choice, check_positive, register
from mmfed.data.layout import ClientSpec
from mmfed.data.samples import MultimodalSplit
from mmfed.protocol import Message, Payload, encode_tensors
from mmfed.teacher.features import TeacherFeatures, caption_key, teacher_features
from mmfed.teacher.reduce import LayerMoments, Reduction, fit_layer_pca, fit_pca, fit_ridge, rms_scaled

IMAGE_REDUCTIONS = ("ridge", "pca", "layer_pca")
IMAGE_SOURCES = ("unet", "latents", "both")
TEXT_MEAN, TEXT_MATRIX = "teacher/text_mean", "teacher/text_matrix"
IMAGE_MEAN, IMAGE_MATRIX = "teacher/image_mean", "teacher/image_matrix"
IMAGE_OFFSET = "teacher/image_offset"


def image_features(
    features: TeacherFeatures,
    source: str,
    split: MultimodalSplit,
    rows: list[int],
    progress: str | None = None,
) -> torch.Tensor:
    """[len(rows), F] teacher image features of `rows` of `split`: U-Net decoder blocks pooled, flattened
    VAE latents, or ``both`` (U-Net columns first, then the latents)."""
    if source == "both":
        parts = [image_features(features, s, split, rows, progress) for s in ("unet", "latents")]
        return torch.cat(parts, dim=1)
    ids = [split.ids[i] for i in rows]
    images = split.images[torch.tensor(rows)]  # type: ignore[index]
    if source == "latents":
        return features.latents(ids, images, progress=progress)
    captions = None if split.captions is None else [split.captions[i][0] for i in rows]
    labels = None if split.image_labels is None else split.image_labels[torch.tensor(rows)].tolist()
    return features.images(ids, images, captions, [0] * len(rows), progress, labels, split.image_classes)


def caption_features(
    features: TeacherFeatures, split: MultimodalSplit, rows: list[int], progress: str | None = None
) -> torch.Tensor:
    """[len(rows), Dt]: each row's captions' pooled text embeddings, averaged over its captions."""
    keys, texts, owner = [], [], []
    for position, row in enumerate(rows):
        for c, caption in enumerate(split.captions[row]):  # type: ignore[index]
            keys.append(caption_key(split.ids[row], c))
            texts.append(caption)
            owner.append(position)
    flat = features.texts(keys, texts, progress=progress)
    out = torch.zeros(len(rows), flat.shape[1])
    out.index_add_(0, torch.tensor(owner), flat)
    return out / torch.bincount(torch.tensor(owner), minlength=len(rows)).clamp(min=1)[:, None]


@register("server_step", "teacher_space")
class TeacherSpace(ServerStep):
    """Fits the teacher-to-latent maps once on public data and sends them to every client."""

    uses_public = True
    evaluate_from_global = True  # sends nothing outside the fit stage

    def __init__(
        self,
        teacher: Any = None,  # the run's `teacher` config (presets interpolate ${teacher})
        data: str = "",  # ${digest:${data}}: sample ids are unique only within one data config
        image_reduction: str = "ridge",
        image_source: str = "unet",
        fit_rows: int | None = 2000,  # public rows the maps are fitted on (None: all)
        ridge: float = 1e-2,
        image_classes: list[str] | None = None,  # class prompts also fitted into the text PCA
        text_classes: list[str] | None = None,
        layer_components: list[int] | None = None,  # layer_pca: components per decoder layer (sum D)
    ) -> None:
        check_choice("image_reduction", image_reduction, IMAGE_REDUCTIONS)
        if layer_components is not None:
            for count in layer_components:
                check_positive("layer_components", count)
        self.layer_components = None if layer_components is None else [int(c) for c in layer_components]
        check_choice("image_source", image_source, IMAGE_SOURCES)
        if fit_rows is not None:
            check_positive("fit_rows", fit_rows)
        self.teacher_cfg, self.data_cfg = teacher, data
        self.image_reduction, self.image_source, self.fit_rows, self.ridge = (
            image_reduction,
            image_source,
            fit_rows,
            ridge,
        )
        self.image_classes, self.text_classes = image_classes, text_classes
        self.text_map: Reduction | None = None
        self.image_map: Reduction | None = None
        self.fit_seconds = 0.0
        self._fitted_now = False
        self._last_stats: dict[str, float] | None = None  # teacher counters when the last round ended

    @property
    def features(self) -> TeacherFeatures:
        return teacher_features(self.teacher_cfg, self.data_cfg)

    def classes(self, public: MultimodalSplit | None) -> tuple[list[str], list[str]]:
        image = (
            self.image_classes if self.image_classes is not None else (public.image_classes if public else [])
        )
        text = self.text_classes if self.text_classes is not None else (public.text_classes if public else [])
        return list(image), list(text)

    def fit(self, round_: ServerRound) -> None:
        """Fit both maps on the public split: once per run (a resumed run loads them from its checkpoint)."""
        if self.text_map is not None:
            return
        public = round_.public
        if public is None or public.images is None or public.captions is None:
            raise ValueError("teacher_space needs paired public data (the data source's 'public' split)")
        started = time.perf_counter()
        dim = _embed_dim(round_)
        rows = list(range(len(public) if self.fit_rows is None else min(self.fit_rows, len(public))))
        feats = self.features
        text = caption_features(feats, public, rows, progress="teacher text features (public)")  # [N, Dt]
        image_cls, text_cls = self.classes(public)
        prompts = [feats.prompts(c) for c in (image_cls, text_cls) if c]
        fitted_on = torch.cat([text, *prompts])
        self.text_map = _padded(_unit_scale(fit_pca(fitted_on, _rank(fitted_on, dim)), text), dim)
        image = image_features(feats, self.image_source, public, rows, progress="teacher features (public)")
        if self.image_reduction == "layer_pca":
            self.image_map = self.layer_map(LayerMoments.of(image, feats.block_widths()), dim)
        else:
            widths = [image.shape[1]]
            if self.image_source == "both":  # U-Net columns, then the VAE latents
                widths = [sum(feats.block_widths()), image.shape[1] - sum(feats.block_widths())]
            scales = _source_scales(image, widths)
            balanced = image * scales
            if self.image_reduction == "ridge":
                fitted = fit_ridge(balanced, self.text_map.apply(text), ridge=self.ridge)
            else:
                fitted = _padded(_unit_scale(fit_pca(balanced, _rank(balanced, dim)), balanced), dim)
            self.image_map = _folded(fitted, scales)
        self.fit_seconds = time.perf_counter() - started
        self._fitted_now = True

    def layer_map(self, moments: LayerMoments, dim: int) -> Reduction:
        """The per-layer PCA of the decoder features (FedDifRC), scaled to unit RMS norm, padded to D."""
        if self.image_source != "unet":
            raise ConfigError("image_reduction=layer_pca reduces U-Net decoder layers: use image_source=unet")
        components = layer_components(dim, len(moments.widths), self.layer_components)
        return _padded(rms_scaled(fit_layer_pca(moments, components), moments), dim)

    def broadcast(self, round_: ServerRound, client: ClientSpec) -> Payload:
        if round_.stage != "fit":
            return Payload()
        if self._last_stats is None:  # the shared teacher features may have counted earlier runs' work
            self._last_stats = self._teacher_counters()
        self.fit(round_)
        assert self.text_map is not None and self.image_map is not None
        tensors = {
            TEXT_MEAN: self.text_map.mean,
            TEXT_MATRIX: self.text_map.matrix,
            IMAGE_MEAN: self.image_map.mean,
            IMAGE_MATRIX: self.image_map.matrix,
            IMAGE_OFFSET: _offset(self.image_map),
        }
        return Payload(tensors=encode_tensors(tensors, "float32"))

    def aggregate(self, round_: ServerRound, replies: list) -> dict[str, float]:
        """This round's teacher work: cache hits/misses, teacher batches run, seconds computed and saved.

        Counts cover every user of this process's teacher features: the server and, on the embedded
        engine, the clients (on Flower, client processes keep their own counts).
        """
        now, before = self._teacher_counters(), self._last_stats or {}
        metrics = {f"teacher/{k}": v - before.get(k, 0.0) for k, v in now.items()}
        self._last_stats = now
        if self._fitted_now:
            metrics["fit_seconds"] = self.fit_seconds
            self._fitted_now = False
        return metrics

    def _teacher_counters(self) -> dict[str, float]:
        return self.features.stats() | {"forward_batches": float(self.features.forward_batches)}

    def state_dict(self) -> dict[str, Any]:
        if self.text_map is None or self.image_map is None:
            return {}
        return {"text_map": self.text_map.state_dict(), "image_map": self.image_map.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.text_map = Reduction.from_state_dict(state["text_map"])
            self.image_map = Reduction.from_state_dict(state["image_map"])


MOMENTS = "teacher_moments/"  # reply tensors: a client's LayerMoments of its own images' teacher features
MOMENT_CLASSES = "teacher_moments/classes"  # reply config: the client's image class names (JSON list)


@register("client_task", "teacher_moments")
class TeacherMoments(ClientTask):
    """Prepare stage, client side: the teacher's decoder features of the client's own images (read
    through the cache, so its later NDCR/TDCL reads are hits) summarised as per-layer moments.

    Only sums leave the client (a count, column sums, per-layer sums of outer products), never an
    image or a per-sample feature; the server adds them and fits the per-layer PCA once.
    """

    kinds: tuple[str, ...] = ("image", "paired")

    def __init__(self, teacher: Any = None, data: str = "") -> None:
        self.teacher_cfg, self.data_cfg = teacher, data

    def run(
        self, split: MultimodalSplit, kind: str, cid: str, seed: int, device: torch.device, quiet: bool
    ) -> Message:
        features = teacher_features(self.teacher_cfg, self.data_cfg)
        if split.images is None or len(split) == 0:
            raise ValueError(f"client {cid}: teacher_moments needs images, this client has none")
        rows = list(range(len(split)))
        progress = None if quiet else f"teacher features ({cid})"
        feats = image_features(features, "unet", split, rows, progress=progress)
        moments = LayerMoments.of(feats, features.block_widths())
        tensors = {MOMENTS + k: v.clone() for k, v in moments.tensors().items()}
        return Message(tensors=tensors, config={MOMENT_CLASSES: json.dumps(list(split.image_classes))})


@register("server_step", "client_teacher_space")
class ClientTeacherSpace(TeacherSpace):
    """The teacher-to-latent maps fitted once, before round 1, without public data (FedDifRC's setting:
    image classification, nothing public): the image map is the per-layer PCA of the summed client
    moments (`teacher_moments`), the text map a PCA of the class-prompt embeddings.

    Needs ``algorithm.client_tasks`` with a `teacher_moments` task (configs/algorithm/feddifrc.yaml has
    one). Checkpointed like `TeacherSpace` (a resumed run loads the maps; the prepare stage is not rerun).
    """

    uses_public = False
    prepares = True

    def __init__(
        self,
        teacher: Any = None,
        data: str = "",
        image_reduction: str = "layer_pca",
        image_classes: list[str] | None = None,
        text_classes: list[str] | None = None,
        layer_components: list[int] | None = None,
    ) -> None:
        if image_reduction != "layer_pca":
            raise ConfigError(
                f"client_teacher_space: image_reduction={image_reduction!r} needs paired public data; "
                "without it only layer_pca can be fitted (use the server step teacher_space for ridge/pca)"
            )
        super().__init__(
            teacher, data, image_reduction, "unet", None, 1e-2, image_classes, text_classes, layer_components
        )

    def fit(self, round_: ServerRound) -> None:
        if self.text_map is None:
            raise ValueError(
                "client_teacher_space has no maps: they are fitted in the prepare stage before round 1 "
                "(a run resumed without its checkpoints/prepared.pt cannot refit them)"
            )

    def aggregate(self, round_: ServerRound, replies: list) -> dict[str, float]:
        if round_.stage != "prepare":
            return super().aggregate(round_, replies)
        if self._last_stats is None:
            self._last_stats = self._teacher_counters()
        started = time.perf_counter()
        uploads = [r for r in replies if MOMENTS + "count" in r.tensors]
        if not uploads:
            raise ValueError(
                "client_teacher_space: no client sent teacher moments (it needs image or paired clients and "
                "algorithm.client_tasks with a teacher_moments task)"
            )
        moments = None
        classes: list[str] | None = None
        for reply in uploads:
            mine = LayerMoments.from_tensors(
                {k[len(MOMENTS) :]: v for k, v in reply.tensors.items() if k.startswith(MOMENTS)}
            )
            moments = mine if moments is None else moments + mine
            theirs = json.loads(reply.config.get(MOMENT_CLASSES, "[]"))
            if classes is not None and theirs != classes:
                raise ValueError(
                    f"client {reply.cid}: its class names {theirs} differ from another's {classes}"
                )
            classes = theirs
        assert moments is not None
        dim = _embed_dim(round_)
        image_cls = self.image_classes if self.image_classes is not None else classes or []
        text_cls = self.text_classes if self.text_classes is not None else []
        if len(image_cls) + len(text_cls) < 2:
            raise ValueError(
                f"client_teacher_space needs at least 2 class names to fit the text map, got "
                f"{image_cls + text_cls} (set algorithm.server_steps.teacher_space.image_classes)"
            )
        prompts = torch.cat([self.features.prompts(c) for c in (image_cls, text_cls) if c])
        self.text_map = _padded(_unit_scale(fit_pca(prompts, _rank(prompts, dim)), prompts), dim)
        self.image_map = self.layer_map(moments, dim)
        self.fit_seconds = time.perf_counter() - started
        return {"fit_seconds": self.fit_seconds, "clients": float(len(uploads)), "rows": float(moments.count)}

    def broadcast(self, round_: ServerRound, client: ClientSpec) -> Payload:
        if round_.stage == "prepare":
            return Payload()  # the clients' task config carries the teacher settings
        return super().broadcast(round_, client)


def layer_components(dim: int, layers: int, given: list[int] | None) -> list[int]:
    """Components per decoder layer. Default: the reference code's 256 / 128 / 128 of 512 for three
    layers, i.e. D/2, D/4, D/4 of the latent dimension D; an even split for another layer count."""
    if given is not None:
        if len(given) != layers or sum(given) > dim:
            raise ConfigError(
                f"layer_components={given} needs one count per decoder layer ({layers}) summing to at most "
                f"the latent dimension {dim}"
            )
        return list(given)
    if layers == 3:
        return [dim // 2, dim // 4, dim - dim // 2 - dim // 4]
    return [dim // layers + (1 if i < dim % layers else 0) for i in range(layers)]


def _embed_dim(round_: ServerRound) -> int:
    model = round_.global_model
    for part in ("image_encoder", "text_encoder"):
        if model.has(part):
            return int(getattr(model, part).projection.out_features)
    raise ValueError("teacher_space: the global model has no encoder to read the latent dimension from")


def _rank(x: torch.Tensor, dim: int) -> int:
    """Components a PCA of `x` can have: a teacher narrower than D (a small text encoder) gives fewer."""
    return min(dim, x.shape[1], x.shape[0] - 1)


def _padded(reduction: Reduction, dim: int) -> Reduction:
    """Zero columns up to D: the teacher's space then spans the first components only, and a cosine
    or L2 target leaves the other latent dimensions to the task losses."""
    missing = dim - reduction.matrix.shape[1]
    if missing <= 0:
        return reduction
    state = reduction.state_dict()
    state["matrix"] = torch.cat([state["matrix"], torch.zeros(state["matrix"].shape[0], missing)], dim=1)
    if state.get("offset") is not None:
        state["offset"] = torch.cat([state["offset"], torch.zeros(missing)])
    return Reduction.from_state_dict(state)


def _unit_scale(reduction: Reduction, fitted_on: torch.Tensor) -> Reduction:
    """Scale a map so that the features it was fitted on have unit mean norm (an L2 loss then has the
    same scale whatever the teacher's feature magnitudes)."""
    norm = reduction.apply(fitted_on).norm(dim=-1).mean().clamp(min=1e-8)
    state = reduction.state_dict()
    state["matrix"] = state["matrix"] / norm
    if "offset" in state:
        state["offset"] = state["offset"] / norm
    return Reduction.from_state_dict(state)


def _source_scales(x: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """[F] column scales giving each source's block (U-Net columns, VAE columns) unit mean centred
    squared norm, so that neither dominates a joint map by its magnitude; ones for a single source."""
    if len(widths) == 1:
        return torch.ones(x.shape[1])
    scales = []
    for block in x.split(widths, dim=1):
        spread = (block - block.mean(dim=0)).pow(2).sum(dim=1).mean().clamp(min=1e-12)
        scales.append(torch.full((block.shape[1],), float(spread) ** -0.5))
    return torch.cat(scales)


def _folded(reduction: Reduction, scales: torch.Tensor) -> Reduction:
    """A map fitted on x * scales, rewritten to take x itself: (x s - m) W = (x - m / s) diag(s) W."""
    state = reduction.state_dict()
    state["mean"] = state["mean"] / scales
    state["matrix"] = state["matrix"] * scales[:, None]
    return Reduction.from_state_dict(state)


def _offset(reduction: Reduction) -> torch.Tensor:
    offset = getattr(reduction, "offset", None)
    return torch.zeros(reduction.matrix.shape[1]) if offset is None else offset


class TeacherView:
    """A client's view of the teacher space: the maps from the payload, the cached features."""

    def __init__(self, round_: ClientRound, teacher: Any, data: str) -> None:
        tensors = round_.payload.tensors
        if TEXT_MATRIX not in tensors:
            raise ConfigError(
                "this loss term needs the teacher maps: add the server step teacher_space "
                "(or semantic_anchors) to algorithm.server_steps"
            )
        self.text_mean, self.text_matrix = tensors[TEXT_MEAN].float(), tensors[TEXT_MATRIX].float()
        self.image_mean, self.image_matrix = tensors[IMAGE_MEAN].float(), tensors[IMAGE_MATRIX].float()
        self.image_offset = tensors[IMAGE_OFFSET].float()
        self.features = teacher_features(teacher, data)
        self.image_classes, self.text_classes = round_.image_classes, round_.text_classes

    def text(self, raw: torch.Tensor) -> torch.Tensor:
        """[..., Dt] teacher text features -> [..., D]."""
        return (raw.to(self.text_matrix) - self.text_mean) @ self.text_matrix

    def image(self, raw: torch.Tensor) -> torch.Tensor:
        """[..., F] teacher image features -> [..., D] (the same space as `text`)."""
        return (raw.to(self.image_matrix) - self.image_mean) @ self.image_matrix + self.image_offset

    def text_to_teacher(self, latent: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., Dt]: the inverse of the text PCA (its transpose), for conditioning prompts on
        a local feature (TDCL conditioned mode)."""
        norms = self.text_matrix.norm(dim=0) ** 2  # [D]: PCA columns are orthogonal; padded ones are 0
        inverse = torch.where(norms > 0, 1 / norms.clamp(min=1e-12), torch.zeros_like(norms))
        return (latent * inverse) @ self.text_matrix.T + self.text_mean


def normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
