"""Reductions to the shared latent dimension: PCA and ridge maps on hand-made data, fitted once."""

from __future__ import annotations

import pytest
import torch

from mmfed.teacher.reduce import (
    LayerMoments,
    Reduction,
    fit_layer_pca,
    fit_pca,
    fit_ridge,
    load_or_fit,
    rms_scaled,
    tensor_digest,
)


def low_rank(n: int = 200, features: int = 12, rank: int = 3, noise: float = 0.0, seed: int = 0):
    """x = mean + z @ basis (+ noise): an orthonormal `basis` [rank, F] spans all the variance."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(features, rank, generator=generator, dtype=torch.float64))[0].T
    scales = torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)[:rank]
    z = torch.randn(n, rank, generator=generator, dtype=torch.float64) * scales
    mean = torch.randn(features, generator=generator, dtype=torch.float64) * 3
    x = mean + z @ basis + noise * torch.randn(n, features, generator=generator, dtype=torch.float64)
    return x, basis


def test_pca_recovers_the_subspace_and_its_variance() -> None:
    x, basis = low_rank()
    reduction = fit_pca(x, 3)
    v = reduction.matrix.double()
    # the projector onto the fitted components equals the projector onto the true basis
    torch.testing.assert_close(v @ v.T, basis.T @ basis, atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    ratio = torch.tensor(reduction.info["explained_variance_ratio"], dtype=torch.float64)
    torch.testing.assert_close(ratio.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-9, rtol=0)
    assert ratio[0] > ratio[1] > ratio[2] > 0
    centred = x - x.mean(0)
    expected_variance = (centred @ v).var(dim=0)  # unbiased, like the info field
    torch.testing.assert_close(
        torch.tensor(reduction.info["explained_variance"], dtype=torch.float64),
        expected_variance,
        rtol=1e-5,
        atol=0,
    )
    assert reduction.info["n"] == 200 and reduction.info["data_digest"] == tensor_digest(x)
    assert (reduction.kind, reduction.in_dim, reduction.out_dim) == ("pca", 12, 3)


def test_pca_apply_is_centred_projection_with_any_leading_dims() -> None:
    x, _ = low_rank(noise=0.1)
    reduction = fit_pca(x.float(), 2)
    expected = (x.float() - reduction.mean) @ reduction.matrix
    out = reduction.apply(x.float())
    assert out.dtype == torch.float32 and out.shape == (200, 2)
    torch.testing.assert_close(out, expected)
    batched = reduction.apply(x.reshape(10, 20, 12))  # float64 in, float32 out, leading dims kept
    assert batched.dtype == torch.float32 and batched.shape == (10, 20, 2)
    torch.testing.assert_close(batched.reshape(200, 2), expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expects \[\.\.\., 12\]"):
        reduction.apply(torch.zeros(3, 11))


def test_pca_sign_is_deterministic() -> None:
    x, _ = low_rank(noise=0.05)
    a = fit_pca(x, 3)
    flipped = fit_pca(-x, 3)  # SVD of -x flips the raw signs; the convention flips them back
    for reduction in (a, flipped):
        v = reduction.matrix
        largest = v.abs().argmax(dim=0)
        assert (v[largest, torch.arange(3)] > 0).all()
    torch.testing.assert_close(flipped.matrix, a.matrix)
    permuted = fit_pca(x[torch.randperm(200, generator=torch.Generator().manual_seed(1))], 3)
    torch.testing.assert_close(permuted.matrix, a.matrix, atol=1e-5, rtol=0)


def test_whitened_pca_gives_unit_variance() -> None:
    x, _ = low_rank(noise=0.01)
    reduction = fit_pca(x, 3, whiten=True)
    out = reduction.apply(x).double()
    torch.testing.assert_close(out.var(dim=0), torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(3, dtype=torch.float64), atol=1e-4, rtol=0)
    assert reduction.info["whiten"] is True
    with pytest.raises(ValueError, match="cannot whiten 4 components"):
        fit_pca(low_rank()[0], 4, whiten=True)  # exactly rank 3: a 4th direction has no variance


def test_pca_errors_name_dim_and_shape() -> None:
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"dim=6 .*\(5, 8\)"):
        fit_pca(x, 6)
    with pytest.raises(ValueError, match=r"dim=0"):
        fit_pca(x, 0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_pca(x[:1], 1)
    with pytest.raises(ValueError, match="2-D"):
        fit_pca(torch.randn(4, 2, 3), 1)
    bad = x.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_pca(bad, 2)


def test_ridge_recovers_a_known_linear_map() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64) * 4 + 1
    true_map = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    y = x @ true_map + torch.tensor([10.0, -3.0], dtype=torch.float64)
    reduction = fit_ridge(x, y, ridge=0.0)
    torch.testing.assert_close(reduction.matrix.double(), true_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(reduction.apply(x).double(), y, atol=1e-3, rtol=1e-5)
    assert reduction.kind == "ridge" and reduction.info["r2"] == pytest.approx(1.0, abs=1e-9)
    tiny = fit_ridge(x, y, ridge=1e-9)
    torch.testing.assert_close(tiny.matrix.double(), true_map, atol=1e-5, rtol=0)


def test_ridge_shrinks_with_a_big_ridge() -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(100, 5, generator=generator)
    y = x @ torch.randn(5, 3, generator=generator) + 0.1 * torch.randn(100, 3, generator=generator)
    norms = [fit_ridge(x, y, ridge=r).matrix.norm().item() for r in (0.0, 1.0, 100.0, 1e6)]
    assert norms == sorted(norms, reverse=True) and norms[-1] < 1e-4 * norms[0]
    # with the map shrunk to zero, every prediction is y's mean
    flat = fit_ridge(x, y, ridge=1e9)
    torch.testing.assert_close(flat.apply(x[:4]), y.mean(0).expand(4, 3), atol=1e-5, rtol=0)


def test_ridge_dual_form_matches_primal_when_features_exceed_samples() -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(20, 50, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    dual = fit_ridge(x, y, ridge=0.1)  # F > N: solved in the 20 x 20 dual
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = 0.1 * (xc**2).sum() / 50
    primal = torch.linalg.solve(xc.T @ xc + lam * torch.eye(50, dtype=torch.float64), xc.T @ yc)
    torch.testing.assert_close(dual.matrix.double(), primal, atol=1e-5, rtol=1e-5)


def test_ridge_errors() -> None:
    with pytest.raises(ValueError, match="number of rows"):
        fit_ridge(torch.randn(5, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        fit_ridge(torch.randn(5, 3), torch.randn(5, 2), ridge=-1.0)
    collinear = torch.randn(10, 1).repeat(1, 3)
    with pytest.raises(ValueError, match="singular; use ridge > 0"):
        fit_ridge(collinear, torch.randn(10, 2), ridge=0.0)


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    x, _ = low_rank(noise=0.1)
    for reduction in (fit_pca(x, 2, whiten=True), fit_ridge(x, x[:, :3], ridge=0.01)):
        path = tmp_path / f"{reduction.kind}.pt"
        reduction.save(path)
        loaded = Reduction.load(path)
        for name in ("mean", "matrix", "offset"):
            assert torch.equal(getattr(loaded, name), getattr(reduction, name))
        assert loaded.kind == reduction.kind and loaded.info == reduction.info
        assert torch.equal(loaded.apply(x), reduction.apply(x))
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(FileNotFoundError, match="no reduction at"):
        Reduction.load(tmp_path / "absent.pt")
    torch.save({"matrix": torch.zeros(2, 2)}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken\.pt.*lacks mean, kind"):
        Reduction.load(tmp_path / "broken.pt")


def test_reduction_validates_its_parts() -> None:
    with pytest.raises(ValueError, match="kind 'lda'"):
        Reduction(mean=torch.zeros(3), matrix=torch.zeros(3, 2), kind="lda")
    with pytest.raises(ValueError, match=r"mean \[F\] and matrix \[F, D\]"):
        Reduction(mean=torch.zeros(4), matrix=torch.zeros(3, 2), kind="pca")
    with pytest.raises(ValueError, match="offset"):
        Reduction(mean=torch.zeros(3), matrix=torch.zeros(3, 2), kind="ridge", offset=torch.zeros(3))


def test_load_or_fit_fits_once_and_refuses_a_changed_fingerprint(tmp_path) -> None:
    x, _ = low_rank(noise=0.1)
    calls = []

    def fit() -> Reduction:
        calls.append(1)
        return fit_pca(x, 2)

    path = tmp_path / "reductions" / "text_pca.pt"
    fingerprint = {"teacher": "tiny-sd", "dim": 2, "prompts": ("a photo of", "an image of")}
    first = load_or_fit(path, fit, fingerprint)
    same = {"prompts": ["a photo of", "an image of"], "dim": 2, "teacher": "tiny-sd"}  # reordered, list
    second = load_or_fit(path, fit, same)
    assert len(calls) == 1 and path.is_file()
    assert torch.equal(first.matrix, second.matrix)
    assert second.info["fingerprint"] == {
        "teacher": "tiny-sd",
        "dim": 2,
        "prompts": ["a photo of", "an image of"],
    }
    with pytest.raises(ValueError, match=r"text_pca\.pt was fitted under fingerprint .*delete it to refit"):
        load_or_fit(path, fit, {**fingerprint, "dim": 3})
    assert len(calls) == 1
    with pytest.raises(TypeError, match="returned ndarray"):
        load_or_fit(tmp_path / "other.pt", lambda: x.numpy(), fingerprint)
    assert not (tmp_path / "other.pt").exists()


# ----------------------------------------------------------------------------- per-layer PCA
def layered() -> torch.Tensor:
    """Two decoder layers: layer A (2 columns) varies along (1, 1) only, layer B (1 column) by itself."""
    return torch.tensor(
        [[1.0, 1.0, 3.0], [-1.0, -1.0, -3.0], [2.0, 2.0, 0.0], [-2.0, -2.0, 0.0]]
    ) + torch.tensor([10.0, 20.0, 5.0])


def test_layer_pca_by_hand() -> None:
    """Each layer gets its own components, the layers are concatenated: a block-diagonal map."""
    reduction = fit_layer_pca(LayerMoments.of(layered(), [2, 1]), components=[1, 1])
    r = 1 / 2**0.5
    expected = torch.tensor([[r, 0.0], [r, 0.0], [0.0, 1.0]])
    assert torch.allclose(reduction.matrix, expected, atol=1e-6)
    assert torch.allclose(reduction.mean, torch.tensor([10.0, 20.0, 5.0]))
    got = reduction.apply(torch.tensor([[11.0, 21.0, 8.0]]))  # centred (1, 1, 3)
    assert torch.allclose(got, torch.tensor([[2 * r, 3.0]]), atol=1e-6)
    # a slot wider than the layer's directions keeps its place, zero-padded
    wide = fit_layer_pca(LayerMoments.of(layered(), [2, 1]), components=[2, 2])
    assert wide.out_dim == 4 and wide.info["kept"] == [1, 1]
    assert torch.allclose(
        wide.apply(torch.tensor([[11.0, 21.0, 8.0]])), torch.tensor([[2 * r, 0, 3.0, 0]]), atol=1e-6
    )


def test_layer_pca_differs_from_one_pca_of_the_concatenation() -> None:
    """The paper reduces each layer on its own: one PCA over all columns mixes the layers."""
    x = layered()
    per_layer = fit_layer_pca(LayerMoments.of(x, [2, 1]), components=[1, 1]).matrix
    joint = fit_pca(x, 2).matrix
    assert per_layer[2, 0] == 0 and per_layer[0, 1] == 0  # block-diagonal
    assert not torch.allclose(joint.abs(), per_layer.abs(), atol=1e-3)


def test_layer_moments_summed_over_clients_fit_the_pca_of_all_rows() -> None:
    """Fitted once from the clients' summed moments = fitted on all their rows together."""
    x, _ = low_rank(n=90, features=9, rank=3, noise=0.1)
    widths, components = [4, 3, 2], [2, 2, 1]
    together = fit_layer_pca(LayerMoments.of(x, widths), components)
    parts = [LayerMoments.of(x[i : i + 30], widths) for i in (0, 30, 60)]
    summed = LayerMoments.from_tensors((parts[0] + parts[1] + parts[2]).tensors())  # through a message
    apart = fit_layer_pca(summed, components)
    assert torch.allclose(together.matrix, apart.matrix, atol=1e-6)
    assert torch.allclose(together.mean, apart.mean, atol=1e-6)
    # each layer's PCA equals the plain PCA of that layer's columns (up to the sign rule, shared)
    first = fit_pca(x[:, :4], 2).matrix
    assert torch.allclose(together.matrix[:4, :2], first, atol=1e-6)
    scaled = rms_scaled(together, LayerMoments.of(x, widths))
    assert scaled.apply(x).pow(2).sum(-1).mean().sqrt().item() == pytest.approx(1.0, rel=1e-5)


def test_layer_pca_is_fitted_once_not_per_batch() -> None:
    """The reference code refits PCA on every batch, so a sample's coordinates depend on its batch.
    A fitted map sends a sample to the same place whatever batch it is in."""
    x, _ = low_rank(n=60, features=9, rank=3, noise=0.1)
    reduction = fit_layer_pca(LayerMoments.of(x, [4, 3, 2]), [2, 2, 1])
    alone = reduction.apply(x[:1])
    assert torch.allclose(reduction.apply(x[:8])[:1], alone)
    assert torch.allclose(reduction.apply(x[30:31].repeat(3, 1)), reduction.apply(x[30:31]).repeat(3, 1))
    refit = fit_layer_pca(LayerMoments.of(x[:8], [4, 3, 2]), [2, 2, 1])  # what a per-batch fit gives
    assert not torch.allclose(refit.apply(x[:1]), alone, atol=1e-3)


def test_layer_pca_errors() -> None:
    with pytest.raises(ValueError, match=r"layer widths \[2, 2\] sum to 4, features have 3"):
        LayerMoments.of(layered(), [2, 2])
    with pytest.raises(ValueError, match="2 component counts for 3 layers"):
        fit_layer_pca(LayerMoments.of(layered(), [1, 1, 1]), [1, 1])
    with pytest.raises(ValueError, match="layer widths differ"):
        LayerMoments.of(layered(), [2, 1]) + LayerMoments.of(layered(), [1, 2])
