from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from mmfed.data import synthetic
from mmfed.data.synthetic import (
    COLOUR_SYNONYMS,
    COLOURS,
    SCENE_WORDS,
    SCENES,
    SHAPE_SYNONYMS,
    SHAPES,
    SyntheticWorld,
)


def small_world(seed: int = 0, **overrides: int) -> SyntheticWorld:
    sizes = {"n_train": 40, "n_public": 8, "n_val": 12, "n_test": 16}
    sizes.update(overrides)
    return SyntheticWorld(seed=seed, **sizes)


def phrase_pattern(phrases: list[str]) -> re.Pattern[str]:
    alternatives = sorted(phrases, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in alternatives) + r")\b", re.IGNORECASE)


SHAPE_PATTERNS = {s: phrase_pattern([w for pair in SHAPE_SYNONYMS[s] for w in pair]) for s in SHAPES}
SINGULAR_PATTERNS = {s: phrase_pattern([pair[0] for pair in SHAPE_SYNONYMS[s]]) for s in SHAPES}
SCENE_PATTERNS = {s: phrase_pattern(list(SCENE_WORDS[s])) for s in SCENES}
COLOUR_PATTERNS = {c: phrase_pattern(list(COLOUR_SYNONYMS[c])) for c in COLOURS}


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=7, n_train=1200, n_public=20, n_val=600, n_test=30)


def test_split_shapes_dtypes_and_ids(world: SyntheticWorld) -> None:
    split = world.split("test")
    assert split.name == "test" and len(split) == 30
    assert split.ids[0] == "syn-test-000000" and split.ids[29] == "syn-test-000029"
    assert split.images is not None and split.images.dtype == torch.uint8
    assert split.images.shape == (30, 3, 32, 32)
    assert split.image_labels is not None and split.image_labels.dtype == torch.int64
    assert split.text_labels is not None and split.text_labels.dtype == torch.int64
    assert split.image_classes == list(SHAPES) == world.image_classes
    assert split.text_classes == list(SCENES) == world.text_classes
    assert world.split("test") is split  # generated once, kept in memory


def test_larger_image_size_and_caption_counts() -> None:
    w = SyntheticWorld(seed=1, image_size=48, n_train=6, n_public=1, n_val=1, n_test=1, captions_per_image=12)
    split = w.split("train")
    assert split.images is not None and split.images.shape == (6, 3, 48, 48)
    assert split.captions is not None
    assert all(len(caps) == 12 and len(set(caps)) == 12 for caps in split.captions)
    one = SyntheticWorld.tiny(seed=1, n=4)
    assert len(one.split("train")) == 4 and len(one.split("val")) == 2


def test_same_seed_is_bit_identical_even_with_a_cold_mask_cache() -> None:
    a = small_world(seed=3).split("train")
    synthetic._MASK_CACHE.clear()
    synthetic._mask_cache_bytes = 0
    b = small_world(seed=3).split("train")
    assert torch.equal(a.images, b.images)  # type: ignore[arg-type]
    assert a.captions == b.captions and a.ids == b.ids
    assert torch.equal(a.image_labels, b.image_labels)  # type: ignore[arg-type]


def test_different_seed_differs() -> None:
    a = small_world(seed=3).split("train")
    b = small_world(seed=4).split("train")
    assert not torch.equal(a.images, b.images)  # type: ignore[arg-type]
    assert a.captions != b.captions


def test_splits_are_independent_streams() -> None:
    direct = small_world(seed=5).split("test")
    other_order = small_world(seed=5)
    other_order.split("train")
    other_order.split("val")
    after = other_order.split("test")
    bigger_train = small_world(seed=5, n_train=77).split("test")
    for split in (after, bigger_train):
        assert torch.equal(direct.images, split.images)  # type: ignore[arg-type]
        assert direct.captions == split.captions
    w = small_world(seed=5)
    assert not torch.equal(w.split("val").images[:8], w.split("public").images)  # type: ignore[index,arg-type]


def test_attributes_match_labels(world: SyntheticWorld) -> None:
    split = world.split("val")
    attrs = world.attributes("val")
    assert len(attrs) == len(split)
    assert [a["shape"] for a in attrs] == [SHAPES[i] for i in split.image_labels.tolist()]  # type: ignore[union-attr]
    assert [a["scene"] for a in attrs] == [SCENES[i] for i in split.text_labels.tolist()]  # type: ignore[union-attr]
    assert {a["count"] for a in attrs} == {1, 2, 3}
    attrs[0]["shape"] = "changed"
    assert world.attributes("val")[0]["shape"] != "changed"  # a copy, not the stored rows


def test_captions_are_distinct_and_mention_scene_and_shape(world: SyntheticWorld) -> None:
    split = world.split("train")
    attrs = world.attributes("train")
    assert split.captions is not None
    with_colour = total = 0
    for caps, a in zip(split.captions, attrs, strict=True):
        assert len(caps) == 5 and len(set(caps)) == 5, caps
        for cap in caps:
            total += 1
            scenes = {s for s, pat in SCENE_PATTERNS.items() if pat.search(cap)}
            assert scenes == {a["scene"]}, (cap, a)
            shapes = {s for s, pat in SHAPE_PATTERNS.items() if pat.search(cap)}
            assert shapes == {a["shape"]}, (cap, a)
            # singular noun iff there is one object
            singular = SINGULAR_PATTERNS[a["shape"]].search(cap) is not None
            plural_hit = re.search(
                "|".join(re.escape(p) + r"\b" for _, p in SHAPE_SYNONYMS[a["shape"]]), cap, re.IGNORECASE
            )
            assert (plural_hit is None) == (a["count"] == 1), (cap, a)
            assert singular or plural_hit
            with_colour += COLOUR_PATTERNS[a["colour"]].search(cap) is not None
            assert cap[0].isupper() and cap.endswith(".") and "  " not in cap and " ," not in cap
    assert 0.7 < with_colour / total < 0.97


def test_labels_in_range_and_roughly_balanced(world: SyntheticWorld) -> None:
    split = world.split("train")
    for labels, k in ((split.image_labels, len(SHAPES)), (split.text_labels, len(SCENES))):
        assert labels is not None
        counts = torch.bincount(labels, minlength=k)
        assert len(counts) == k and int(labels.min()) >= 0
        expected = len(split) / k
        assert bool((counts > 0.6 * expected).all() and (counts < 1.4 * expected).all()), counts
    colours = Counter(a["colour"] for a in world.attributes("train"))
    assert set(colours) == set(COLOURS)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"seed": -1}, "seed"),
        ({"image_size": 16}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"n_train": 0}, "n_train"),
        ({"n_public": -3}, "n_public"),
        ({"n_val": 1.5}, "n_val"),
        ({"n_test": True}, "n_test"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"sizes": ("huge",)}, "sizes"),
        ({"counts": ()}, "counts"),
        ({"positions": ("centre", "centre")}, "positions"),
        ({"styles": ("photo", "sepia")}, "styles"),
    ],
)
def test_constructor_validation(kwargs: dict[str, object], arg: str) -> None:
    with pytest.raises(ValueError, match=arg) as info:
        SyntheticWorld(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_unknown_split_names_allowed_values() -> None:
    w = small_world()
    with pytest.raises(ValueError, match="train, public, val, test"):
        w.split("dev")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        w.attributes("dev")


# --- learnability: would fail on a generator whose pixels or words do not follow the labels ------------


def _ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, k: int) -> np.ndarray:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    b = np.c_[(x_eval - mu) / sd, np.ones(len(x_eval))]
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ np.eye(k)[y_train])
    return (b @ w).argmax(1)


def _spectrum_features(images: torch.Tensor) -> np.ndarray:
    """Rotation-invariant texture features: radially binned power spectrum + mean gradients."""
    g = images.float().mean(1)
    g = g - g.mean((1, 2), keepdim=True)
    power = torch.fft.fft2(g).abs() ** 2
    power = power / power.sum((1, 2), keepdim=True).clamp_min(1e-8)
    f = torch.fft.fftfreq(g.shape[1])
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    edges = torch.linspace(0, 0.71, 9)
    feats = [
        power[:, (radius >= lo) & (radius < hi)].sum(1) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    feats.append((g[:, :, 1:] - g[:, :, :-1]).abs().mean((1, 2)))
    feats.append((g[:, 1:, :] - g[:, :-1, :]).abs().mean((1, 2)))
    return torch.log(torch.stack(feats, 1) + 1e-6).numpy()


def _colour_histogram(images: torch.Tensor, bins: int = 4) -> np.ndarray:
    q = images.long() * bins // 256
    index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    hist = torch.stack([torch.bincount(i.flatten(), minlength=bins**3) for i in index]).float()
    return torch.sqrt(hist / index[0].numel()).numpy()


def test_pixels_carry_scene_and_colour_but_colour_does_not_give_shape(world: SyntheticWorld) -> None:
    train, val = world.split("train"), world.split("val")
    assert train.images is not None and val.images is not None
    y_train, y_val = train.text_labels.numpy(), val.text_labels.numpy()  # type: ignore[union-attr]
    pred = _ridge_predict(
        _spectrum_features(train.images), y_train, _spectrum_features(val.images), len(SCENES)
    )
    scene_acc = float((pred == y_val).mean())
    assert scene_acc > 0.55, scene_acc  # chance is 0.25; a CNN does much better

    hist_train, hist_val = _colour_histogram(train.images), _colour_histogram(val.images)
    c_train = np.array([COLOURS.index(a["colour"]) for a in world.attributes("train")])
    c_val = np.array([COLOURS.index(a["colour"]) for a in world.attributes("val")])
    colour_acc = float((_ridge_predict(hist_train, c_train, hist_val, len(COLOURS)) == c_val).mean())
    assert colour_acc > 0.85, colour_acc

    s_train, s_val = train.image_labels.numpy(), val.image_labels.numpy()  # type: ignore[union-attr]
    shape_acc = float((_ridge_predict(hist_train, s_train, hist_val, len(SHAPES)) == s_val).mean())
    assert shape_acc < 0.3, shape_acc  # colour statistics alone must not give the shape away


def test_scene_is_recoverable_from_caption_words(world: SyntheticWorld) -> None:
    """Multinomial naive Bayes on bag-of-words: the text label is well defined by the words."""
    train_texts, _, train_labels = world.split("train").flat_captions()
    val_texts, _, val_labels = world.split("val").flat_captions()

    def tokens(text: str) -> list[str]:
        return re.findall(r"[a-z-]+", text.lower())

    vocab = {w: i for i, w in enumerate(sorted({t for text in train_texts for t in tokens(text)}))}

    def bow(texts: list[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(vocab)))
        for row, text in enumerate(texts):
            for t in tokens(text):
                if t in vocab:
                    x[row, vocab[t]] += 1
        return x

    x_train, x_val = bow(train_texts), bow(val_texts)
    y_train = train_labels.numpy()
    counts = np.stack([x_train[y_train == k].sum(0) for k in range(len(SCENES))]) + 1.0
    log_p = np.log(counts / counts.sum(1, keepdims=True))
    pred = (x_val @ log_p.T).argmax(1)
    acc = float((pred == val_labels.numpy()).mean())
    assert acc > 0.99, acc


def test_restricted_attributes_change_only_what_they_restrict() -> None:
    easy = small_world(sizes=("large",), counts=(1,), positions=("centre",))
    attributes = easy.attributes("train")
    assert {a["size"] for a in attributes} == {"large"}
    assert {a["count"] for a in attributes} == {1}
    assert {a["position"] for a in attributes} == {"centre"}
    assert len({a["shape"] for a in attributes}) > 5  # the label still varies
    for caps, a in zip(easy.split("train").captions, attributes, strict=True):
        assert all(SHAPE_PATTERNS[a["shape"]].search(c) for c in caps)


def test_options_at_their_defaults_leave_the_world_as_it_was() -> None:
    # the same draws as before the options existed: a golden digest of the default world
    import hashlib

    split = SyntheticWorld(n_train=50, n_public=10, n_val=10, n_test=10).split("train")
    assert hashlib.md5(split.images.numpy().tobytes()).hexdigest() == "c00c4ca0a082e223f4bd1826b61ae3a0"
    assert split.domains is None


def test_styles_are_maps_of_the_same_rendered_rows() -> None:
    styles = ("photo", "inverted", "grey", "swapped", "faded")
    plain, styled = small_world(), small_world(styles=styles)
    base, out, domains = (
        plain.split("train").images,
        styled.split("train").images,
        styled.split("train").domains,
    )
    assert styled.split("train").domain_names == list(styles)
    assert set(domains.tolist()) == set(range(5))
    assert [a["style"] for a in styled.attributes("train")] == [styles[d] for d in domains.tolist()]
    for d, style in enumerate(styles):
        rows = domains == d
        if style == "photo":
            assert torch.equal(out[rows], base[rows])
        elif style == "inverted":
            assert torch.equal(out[rows], 255 - base[rows])
        elif style == "swapped":
            assert torch.equal(out[rows], base[rows][:, [2, 0, 1]])
        elif style == "grey":
            assert torch.equal(out[rows][:, 0], out[rows][:, 1]) and not torch.equal(out[rows], base[rows])
        else:  # faded: less contrast than the photo
            assert out[rows].float().std() < 0.5 * base[rows].float().std()
    assert plain.split("train").captions == styled.split("train").captions  # captions never name the style
