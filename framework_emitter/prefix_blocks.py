"""Prompt blocks of a trace call, hashed the way vLLM chains prefix-cache block hashes.

A prompt is its segments' tokens in order; segment ids stand for their text
(same id => same tokens). Block i covers tokens [i*B, (i+1)*B); its hash
chains the previous block's hash with the (segment id, token range) pieces it
covers, so two prompts share a block exactly when they share everything up
to its end, as in vLLM. Only full blocks are cacheable.
"""
from __future__ import annotations

import hashlib
from typing import Sequence


def block_hashes(segments: Sequence[tuple[str, int]], block_size: int = 32) -> list[str]:
    """Hex hashes of the prompt's full blocks, in order."""
    hashes: list[str] = []
    parent = b""
    pieces: list[bytes] = []
    filled = 0
    for seg_id, tokens in segments:
        offset = 0
        while offset < tokens:
            take = min(tokens - offset, block_size - filled)
            pieces.append(f"{seg_id}:{offset}:{take}".encode())
            offset += take
            filled += take
            if filled == block_size:
                digest = hashlib.blake2b(parent + b"|" + b",".join(pieces), digest_size=12).digest()
                hashes.append(digest.hex())
                parent, pieces, filled = digest, [], 0
    return hashes
