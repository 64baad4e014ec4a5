"""HashingTokenizer: the offline word tokenizer of the small text encoders."""

from __future__ import annotations

import pytest
import torch

import mmfed  # noqa: F401  (installs the torchvision guard before anything else imports)
from mmfed.models.tokenizer import PAD_ID, HashingTokenizer


def test_ids_are_deterministic_across_instances_and_calls() -> None:
    texts = ["A red circle on the left.", "two blue squares", "zebra 42"]
    first = HashingTokenizer(vocab_size=1000, max_length=8)(texts)
    second = HashingTokenizer(vocab_size=1000, max_length=8)(texts)
    again = HashingTokenizer(vocab_size=1000, max_length=8)
    again(["warm the cache with other words first"])
    third = again(texts)
    for other in (second, third):
        assert torch.equal(first["input_ids"], other["input_ids"])
        assert torch.equal(first["attention_mask"], other["attention_mask"])
    # The same word gets the same id wherever it appears.
    tok = HashingTokenizer(vocab_size=1000)
    assert tok(["red"])["input_ids"][0, 0] == tok(["a red circle"])["input_ids"][0, 1]


def test_ids_depend_on_vocab_size_and_words_mostly_differ() -> None:
    words = [f"word{i}" for i in range(50)]
    ids = HashingTokenizer(vocab_size=8192, max_length=64)([" ".join(words)])["input_ids"][0]
    assert len(set(ids.tolist())) >= 48  # CRC32 into 8190 buckets: collisions are rare
    small = HashingTokenizer(vocab_size=16, max_length=64)([" ".join(words)])["input_ids"][0]
    assert not torch.equal(ids, small)


def test_case_and_punctuation_are_folded() -> None:
    tok = HashingTokenizer(vocab_size=512, max_length=16)
    plain = tok(["a red circle on the left"])["input_ids"]
    variants = [
        "A Red CIRCLE, on the left!",
        "  a   red-circle (on) the...left ",
        "a\tred\ncircle;on:the/left",
    ]
    for variant in variants:
        assert torch.equal(tok([variant])["input_ids"], plain), variant
    # Digits are word characters; punctuation splits words.
    assert tok(["route66"])["input_ids"].shape == (1, 1)
    assert tok(["route-66"])["input_ids"].shape == (1, 2)


def test_truncation_to_max_length() -> None:
    tok = HashingTokenizer(vocab_size=512, max_length=4)
    long = " ".join(f"w{i}" for i in range(10))
    out = tok([long])
    assert out["input_ids"].shape == (1, 4)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1]]
    # Truncation keeps the first words.
    assert torch.equal(out["input_ids"], tok(["w0 w1 w2 w3"])["input_ids"])


def test_padding_and_attention_mask() -> None:
    tok = HashingTokenizer(vocab_size=512, max_length=10)
    out = tok(["one", "one two three", "one two"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (3, 3)  # padded to the longest text, not to max_length
    assert ids.dtype == mask.dtype == torch.long
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert torch.equal(ids == PAD_ID, mask == 0)
    assert ids[0, 0] == ids[1, 0] == ids[2, 0]
    # A text alone gets the same ids as its unpadded prefix in a batch.
    assert torch.equal(tok(["one two"])["input_ids"][0], ids[2, :2])


def test_empty_and_wordless_texts() -> None:
    tok = HashingTokenizer(vocab_size=512, max_length=10)
    for texts in ([""], ["!!! ..."], ["", "   "]):
        out = tok(texts)
        assert out["input_ids"].shape == (len(texts), 1)  # at least one column
        assert out["input_ids"].eq(PAD_ID).all() and out["attention_mask"].eq(0).all()
    mixed = tok(["", "a b"])
    assert mixed["attention_mask"].tolist() == [[0, 0], [1, 1]]
    assert tok([])["input_ids"].shape == (0, 1)


@pytest.mark.parametrize("vocab_size", [16, 17, 100, 8192])
def test_ids_stay_in_vocab_bounds(vocab_size: int) -> None:
    tok = HashingTokenizer(vocab_size=vocab_size, max_length=300)
    text = " ".join(f"token{i}" for i in range(300))
    ids = tok([text])["input_ids"]
    assert ids.min() >= 2 and ids.max() < vocab_size  # 0 = padding, 1 = reserved
    assert all(2 <= tok.word_id(f"w{i}") < vocab_size for i in range(1000))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 15}, "vocab_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": -3}, "max_length"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HashingTokenizer(**kwargs)
