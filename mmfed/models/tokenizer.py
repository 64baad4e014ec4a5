"""An offline word tokenizer for the small text encoders.

Why hashing: it needs no vocabulary file and no fitting, so every client (and the server) gets
the same ids for the same word with nothing to ship or download, and it works on any text (the
synthetic captions, AG News, COCO). Words are lower-cased runs of letters/digits; a word's id is
a stable CRC32 hash into `vocab_size - 2` buckets (0 = padding, 1 = unused/reserved).
"""

from __future__ import annotations

import re
import zlib

import torch

_WORD = re.compile(r"[a-z0-9]+")
PAD_ID = 0


class HashingTokenizer:
    def __init__(self, vocab_size: int = 8192, max_length: int = 32) -> None:
        if vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self._cache: dict[str, int] = {}

    def word_id(self, word: str) -> int:
        token = self._cache.get(word)
        if token is None:
            token = 2 + zlib.crc32(word.encode()) % (self.vocab_size - 2)
            self._cache[word] = token
        return token

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """-> input_ids, attention_mask: int64 [B, L], L = longest text (capped at max_length)."""
        rows = [[self.word_id(w) for w in _WORD.findall(text.lower())][: self.max_length] for text in texts]
        length = max(1, max((len(r) for r in rows), default=1))
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != PAD_ID).long()}
