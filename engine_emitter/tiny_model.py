"""A small random-weight Llama, generated locally (no downloads), for tests and benchmarks.

No tokenizer: requests carry token ids (``skip_tokenizer_init=True``).
Deterministic for a given seed and size, and cached in ``directory``.
"""
from __future__ import annotations

import json
from pathlib import Path

SIZES = {
    # name: (hidden, layers, heads, intermediate, vocab)
    "tiny": (128, 2, 4, 256, 4096),
    "medium": (512, 4, 8, 1408, 32000),  # ~46M: for CPUs without AVX-512, where "small" prefills at < 400 tokens/s
    "small": (1024, 8, 16, 2816, 32000),  # ~150M parameters: prefill cost makes cache hits matter on CPU
}


def make_random_llama(directory: str | Path, size: str = "tiny", seed: int = 0, max_len: int = 4096) -> Path:
    """Write (once) a random-weight LlamaForCausalLM to ``directory``; returns the path."""
    path = Path(directory)
    marker = path / "agentrt-model.json"
    spec = {"size": size, "seed": seed, "max_len": max_len}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, intermediate, vocab = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=max_len, torch_dtype="bfloat16", tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    marker.write_text(json.dumps(spec))
    return path
