"""CUDA fast-path kernels of the native engine (Triton). Importing this package never imports
triton; the kernels compile on first use. `triton_available()` tells whether they can run."""

from shard.native.kernels.triton_attention import (
    DecodeConfig,
    PrefillConfig,
    TritonAttention,
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
    triton_available,
)

__all__ = [
    "DecodeConfig",
    "PrefillConfig",
    "TritonAttention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "store_kv",
    "triton_available",
]
