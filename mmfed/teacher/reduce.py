"""Linear maps from teacher features to the shared latent dimension D, fitted once and shipped as a matrix.

The teacher's features are wide (a 768-d text embedding, a 1280-channel U-Net map) and the federated
models work in D. A `Reduction` is ``x -> (x - mean) @ matrix + offset``: PCA (`fit_pca`) for one
feature space, ridge regression (`fit_ridge`) to put another feature space into it (U-Net image
features onto the text-embedding PCA, fitted on public image-caption pairs). Unlike the FedDifRC
reference code, which refits PCA on every batch (so a feature's coordinates change from batch to
batch), a reduction is fitted once on public data and stored with a fingerprint of what it was fitted
on (`load_or_fit`); every client and round then applies the same matrix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmfed.teacher.cache import canonical_fingerprint, fingerprint_digest
from mmfed.utils.io import load_torch, save_torch

KINDS = ("pca", "ridge")


@dataclass
class Reduction:
    """x -> (x - mean) @ matrix + offset: the teacher features' map to the shared latent dimension D."""

    mean: torch.Tensor  # [F]
    matrix: torch.Tensor  # [F, D]
    kind: str  # "pca" | "ridge"
    info: dict[str, Any] = field(default_factory=dict)  # explained variance, n fitted on, data digest ...
    offset: torch.Tensor | None = None  # [D]; a ridge map's target mean (zeros for PCA)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"reduction kind {self.kind!r} is not one of {', '.join(KINDS)}")
        self.mean = self.mean.detach().to("cpu", torch.float32)
        self.matrix = self.matrix.detach().to("cpu", torch.float32)
        if self.matrix.ndim != 2 or self.mean.shape != (self.matrix.shape[0],):
            raise ValueError(
                f"a reduction needs mean [F] and matrix [F, D]; got {tuple(self.mean.shape)} "
                f"and {tuple(self.matrix.shape)}"
            )
        offset = torch.zeros(self.out_dim) if self.offset is None else self.offset
        self.offset = offset.detach().to("cpu", torch.float32)
        if self.offset.shape != (self.out_dim,):
            raise ValueError(f"offset has shape {tuple(self.offset.shape)}; expected ({self.out_dim},)")

    @property
    def in_dim(self) -> int:
        return self.matrix.shape[0]

    @property
    def out_dim(self) -> int:
        return self.matrix.shape[1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """[..., F] -> [..., D] float32, on x's device."""
        if x.shape[-1:] != (self.in_dim,):
            raise ValueError(f"{self.kind} reduction expects [..., {self.in_dim}], got {tuple(x.shape)}")
        assert self.offset is not None
        device = x.device
        centred = x.to(torch.float32) - self.mean.to(device)
        return centred @ self.matrix.to(device) + self.offset.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "matrix": self.matrix,
            "offset": self.offset,
            "kind": self.kind,
            "info": self.info,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Reduction:
        missing = [name for name in ("mean", "matrix", "kind") if name not in state]
        if missing:
            raise KeyError(f"reduction state lacks {', '.join(missing)}")
        return cls(
            mean=state["mean"],
            matrix=state["matrix"],
            kind=state["kind"],
            info=dict(state.get("info", {})),
            offset=state.get("offset"),
        )

    def save(self, path: str | Path) -> None:
        save_torch(self.state_dict(), path)  # atomic: a reader never sees half a matrix

    @classmethod
    def load(cls, path: str | Path) -> Reduction:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reduction at {path}")
        state = load_torch(path)
        if not isinstance(state, Mapping):
            raise ValueError(f"{path} does not hold a reduction state dict")
        try:
            return cls.from_state_dict(state)
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error


def fit_pca(x: torch.Tensor, dim: int, *, whiten: bool = False) -> Reduction:
    """Top-`dim` principal components of x [N, F] (centred, SVD in float64).

    Each component's sign is fixed so that its largest-magnitude loading is positive: SVD's sign is
    arbitrary, and a refit on the same data (another machine, another LAPACK) must give the same map.
    `whiten` scales each component to unit variance (divides by s_k / sqrt(N - 1)).
    """
    data = _matrix("x", x)
    n, features = data.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 samples, got data of shape {tuple(x.shape)}")
    if not 1 <= dim <= min(n, features):
        raise ValueError(f"PCA dim={dim} must be in [1, min(N, F)] for data of shape {tuple(x.shape)}")
    mean = data.mean(dim=0)
    _, singular, vh = torch.linalg.svd(data - mean, full_matrices=False)
    components = vh[:dim].T  # [F, dim]
    largest = components.abs().argmax(dim=0)
    components = components * torch.sign(components[largest, torch.arange(dim)])
    variance = singular**2 / (n - 1)
    if whiten:
        scale = variance[:dim].sqrt()
        if not (scale > scale.max() * 1e-12).all() or scale.max() == 0:
            raise ValueError(f"cannot whiten {dim} components: data {tuple(x.shape)} has fewer directions")
        components = components / scale
    total = variance.sum()
    ratio = variance[:dim] / total if total > 0 else torch.zeros(dim, dtype=torch.float64)
    info = {
        "n": n,
        "whiten": whiten,
        "explained_variance": variance[:dim].tolist(),
        "explained_variance_ratio": ratio.tolist(),
        "data_digest": tensor_digest(x),
    }
    return Reduction(mean=mean, matrix=components, kind="pca", info=info)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-3) -> Reduction:
    """Least-squares map from features x [N, F] onto targets y [N, D], closed form in float64.

    W = (Xc^T Xc + lambda I)^-1 Xc^T Yc with lambda = ridge * trace(Xc^T Xc) / F, so `ridge` does not
    depend on the features' scale; when F > N the same W is solved in its N x N dual form
    W = Xc^T (Xc Xc^T + lambda I)^-1 Yc. The Reduction maps x to its predicted y (offset = y's mean).
    """
    inputs, targets = _matrix("x", x), _matrix("y", y)
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ in their number of rows")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    n, features = inputs.shape
    x_mean, y_mean = inputs.mean(dim=0), targets.mean(dim=0)
    xc, yc = inputs - x_mean, targets - y_mean
    lam = ridge * float((xc**2).sum()) / features
    try:
        if features <= n:
            gram = xc.T @ xc + lam * torch.eye(features, dtype=torch.float64)
            weights = torch.linalg.solve(gram, xc.T @ yc)
        else:
            gram = xc @ xc.T + lam * torch.eye(n, dtype=torch.float64)
            weights = xc.T @ torch.linalg.solve(gram, yc)
    except torch.linalg.LinAlgError as error:
        raise ValueError(
            f"ridge={ridge} leaves the system for x {tuple(x.shape)} singular; use ridge > 0"
        ) from error
    residual = ((xc @ weights - yc) ** 2).sum()
    spread = (yc**2).sum()
    info = {
        "n": n,
        "ridge": ridge,
        "lambda": lam,
        "r2": float(1 - residual / spread) if spread > 0 else 1.0,
        "data_digest": tensor_digest(x),
        "target_digest": tensor_digest(y),
    }
    return Reduction(mean=x_mean, matrix=weights, kind="ridge", info=info, offset=y_mean)


def load_or_fit(path: str | Path, fit: Callable[[], Reduction], fingerprint: Mapping[str, Any]) -> Reduction:
    """Fitted once: load `path` when it was fitted under `fingerprint`; fit and save it when absent.

    A file fitted under another fingerprint is an error, never silently refitted: clients already hold
    its matrix, and a new one would put their features in other coordinates.
    """
    path = Path(path)
    wanted = canonical_fingerprint(fingerprint)
    if path.exists():
        reduction = Reduction.load(path)
        stored = reduction.info.get("fingerprint")
        if stored != wanted:
            raise ValueError(
                f"{path} was fitted under fingerprint {stored}, not {wanted}; delete it to refit"
            )
        return reduction
    reduction = fit()
    if not isinstance(reduction, Reduction):
        raise TypeError(f"fit for {path} returned {type(reduction).__name__}, not a Reduction")
    reduction.info["fingerprint"] = wanted
    reduction.info["fingerprint_digest"] = fingerprint_digest(wanted)
    reduction.save(path)
    return reduction


def tensor_digest(x: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes, first 16 hex chars: which data a map was fitted on."""
    data = x.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def _matrix(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or 0 in x.shape:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a non-empty 2-D tensor [N, F], got {shape}")
    data = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(data).all():
        raise ValueError(f"{name} {tuple(x.shape)} holds NaN or inf")
    return data


@dataclass
class LayerMoments:
    """Sufficient statistics of teacher features for a per-layer PCA: the row count, the column sums
    [F] and, per layer (a slice of `widths` columns), the sum of outer products [w, w] (float64).

    Moments add: clients each send theirs for their own images and the server sums them, so the PCA
    is fitted once on every client's data without any image leaving its client.
    """

    widths: list[int]
    count: int
    total: torch.Tensor  # [F]
    outer: list[torch.Tensor]  # [w_l, w_l] per layer

    @classmethod
    def of(cls, x: torch.Tensor, widths: list[int]) -> LayerMoments:
        data = _matrix("x", x)
        if sum(widths) != data.shape[1]:
            raise ValueError(f"layer widths {widths} sum to {sum(widths)}, features have {data.shape[1]}")
        blocks = data.split(list(widths), dim=1)
        return cls(list(widths), data.shape[0], data.sum(dim=0), [b.T @ b for b in blocks])

    def __add__(self, other: LayerMoments) -> LayerMoments:
        if self.widths != other.widths:
            raise ValueError(f"layer widths differ: {self.widths} vs {other.widths}")
        outer = [a + b for a, b in zip(self.outer, other.outer, strict=True)]
        return LayerMoments(self.widths, self.count + other.count, self.total + other.total, outer)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"count": torch.tensor([self.count], dtype=torch.float64), "total": self.total}
        return out | {f"outer/{i}": m for i, m in enumerate(self.outer)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> LayerMoments:
        layers = sorted(int(k.split("/", 1)[1]) for k in tensors if k.startswith("outer/"))
        outer = [tensors[f"outer/{i}"].to(torch.float64) for i in layers]
        widths = [m.shape[0] for m in outer]
        return cls(widths, int(tensors["count"].item()), tensors["total"].to(torch.float64), outer)


def fit_layer_pca(moments: LayerMoments, components: list[int]) -> Reduction:
    """Per-layer PCA (FedDifRC): layer l's columns are reduced to its own `components[l]` principal
    components and the layers are concatenated, one block-diagonal matrix [F, sum(components)].

    A layer with fewer directions (narrower than asked, or fewer rows than components) keeps what it
    has and zero columns pad its slot, so a feature's coordinates always sit in the same slots. Signs
    are fixed as in `fit_pca`. Fitted from moments (`LayerMoments`), so it is the same whether the
    rows came from one split or were summed over clients.
    """
    if len(components) != len(moments.widths):
        raise ValueError(f"{len(components)} component counts for {len(moments.widths)} layers")
    if moments.count < 2:
        raise ValueError(f"per-layer PCA needs at least 2 samples, got {moments.count}")
    n = moments.count
    mean = moments.total / n
    matrix = torch.zeros(sum(moments.widths), sum(components), dtype=torch.float64)
    row = col = 0
    kept, ratios = [], []
    for width, outer, wanted in zip(moments.widths, moments.outer, components, strict=True):
        check = int(wanted)
        if check < 1:
            raise ValueError(f"per-layer PCA components must be >= 1, got {components}")
        m = mean[row : row + width]
        covariance = (outer - n * torch.outer(m, m)) / (n - 1)
        values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)  # ascending
        values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
        rank = min(check, width, n - 1, int((values > values[0] * 1e-10).sum()) if values[0] > 0 else 0)
        if rank:
            top = vectors[:, :rank]
            largest = top.abs().argmax(dim=0)
            top = top * torch.sign(top[largest, torch.arange(rank)])
            matrix[row : row + width, col : col + rank] = top
        total = values.sum()
        ratios.append(float(values[:rank].sum() / total) if total > 0 else 0.0)
        kept.append(rank)
        row, col = row + width, col + check
    info = {
        "n": n,
        "widths": moments.widths,
        "components": list(components),
        "kept": kept,
        "explained_variance_ratio": ratios,
        "per_layer": True,
    }
    return Reduction(mean=mean, matrix=matrix, kind="pca", info=info)


def rms_scaled(reduction: Reduction, moments: LayerMoments) -> Reduction:
    """Scale a per-layer PCA so the features it was fitted on have unit root-mean-square norm
    (computed from the moments: E||(x - mean) W||^2 = sum_l trace(W_l^T Cov_l W_l) (n-1)/n)."""
    n = moments.count
    mean = moments.total / n
    row, energy = 0, 0.0
    matrix = reduction.matrix.to(torch.float64)
    for width, outer in zip(moments.widths, moments.outer, strict=True):
        m = mean[row : row + width]
        scatter = outer - n * torch.outer(m, m)  # sum of centred outer products
        w = matrix[row : row + width]
        energy += float(torch.trace(w.T @ scatter @ w))
        row += width
    scale = max((energy / n) ** 0.5, 1e-8)
    state = reduction.state_dict()
    state["matrix"] = state["matrix"] / scale
    state["info"] = dict(state["info"]) | {"scale": scale}
    return Reduction.from_state_dict(state)
