"""Prompts as token ids with exactly a trace's prefix sharing (no tokenizer, no text).

Each segment id maps to a deterministic pseudo-random token sequence of the
segment's token count, so equal segment ids give equal tokens and prompts
share exactly the prefixes the trace says they share.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def segment_tokens(seg_id: str, n_tokens: int, vocab_size: int) -> list[int]:
    seed = int.from_bytes(hashlib.blake2b(seg_id.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab_size, size=n_tokens).tolist()  # 0 left out: often special


def prompt_token_ids(segments: Sequence[tuple[str, int]], vocab_size: int, max_tokens: int | None = None) -> list[int]:
    """The prompt's token ids; truncated to ``max_tokens`` (the caller warns) when given."""
    out: list[int] = []
    for seg_id, n_tokens in segments:
        out.extend(segment_tokens(seg_id, n_tokens, vocab_size))
        if max_tokens is not None and len(out) >= max_tokens:
            return out[:max_tokens]
    return out
