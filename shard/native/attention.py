"""Attention backends over the paged KV cache, behind one small interface, picked by name.

Every backend does the same two things for one layer of one step (forward.py's contract):
1. writes the new tokens' K/V into the cache at meta.slot_mapping;
2. attends every new token to all cached K/V of its own sequence, causally: the new token at
   position p sees positions 0..p (its prefix-cache hit, earlier new tokens, itself).
ReferenceAttention (gather + torch SDPA) runs on CPU and CUDA and is the correctness reference the
fast backends are tested against.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from shard.engine.base import EngineConfigError
from shard.native.forward import AttentionMetadata


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # (T, Hq, D) new tokens, RoPE applied
        k: torch.Tensor,  # (T, Hkv, D)
        v: torch.Tensor,  # (T, Hkv, D)
        k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D), written in place
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (T, Hq, D)
        """Writes k/v at meta.slot_mapping, then returns causal attention of q over each sequence's
        cached K/V. Hq is a multiple of Hkv (GQA: query head h reads kv head h // (Hq // Hkv))."""
        ...


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatters (T, Hkv, D) k/v into the flat slot view (num_blocks * block_size, Hkv, D)."""
    hkv, d = k_cache.shape[-2:]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


class ReferenceAttention:
    """Gather + SDPA. Prefill loops over sequences (a prefill with no cached prefix attends to its
    new K/V directly); decode gathers every sequence's blocks at once and masks by length."""

    name = "reference"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_prefill:
            return self._prefill(q, k, v, k_cache, v_cache, meta, scale)
        return self._decode(q, k_cache, v_cache, meta, scale)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        groups = q.shape[1] // k.shape[1]
        block_size = k_cache.shape[1]
        cu = meta.cu_seqlens_q.tolist()
        seq_lens = meta.seq_lens.tolist()
        for i, seq_len in enumerate(seq_lens):
            start, end = cu[i], cu[i + 1]
            n_new = end - start
            if n_new == 0:
                continue
            prefix = seq_len - n_new
            qi = q[start:end].transpose(0, 1)[None]  # (1, Hq, n, D)
            if prefix == 0:
                ki, vi = k[start:end].transpose(0, 1)[None], v[start:end].transpose(0, 1)[None]  # (1, Hkv, n, D)
                mask, causal = None, True
            else:
                n_blocks = -(-seq_len // block_size)
                blocks = meta.block_tables[i, :n_blocks].long()
                # (n_blocks, bs, Hkv, D) -> (seq_len, Hkv, D) -> (1, Hkv, seq_len, D)
                ki = k_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].transpose(0, 1)[None]
                vi = v_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].transpose(0, 1)[None]
                # new token r sits at position prefix + r and sees keys 0..prefix + r
                key_pos = torch.arange(seq_len, device=q.device)
                query_pos = torch.arange(prefix, seq_len, device=q.device)
                mask, causal = key_pos[None, :] <= query_pos[:, None], False  # (n, seq_len)
            # 4-D with a batch dim and enable_gqa (no repeated K/V): torch's CPU SDPA takes its
            # flash kernel for these, and its math fallback (2.2x slower, measured) for 3-D inputs.
            oi = F.scaled_dot_product_attention(
                qi, ki.to(q.dtype), vi.to(q.dtype), attn_mask=mask, is_causal=causal, scale=scale,
                enable_gqa=groups > 1,
            )[0]
            out[start:end] = oi.transpose(0, 1)
        return out

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        # Decode: exactly one new token per sequence, so row b of q belongs to sequence b.
        b, hq, d = q.shape
        assert b == meta.seq_lens.shape[0], "decode expects one new token per sequence"
        hkv, block_size = k_cache.shape[2], k_cache.shape[1]
        flat_blocks, mask = self._decode_index(meta, block_size)
        # index_select on the block dim is one memcpy per block (CPU advanced indexing k_cache[t]
        # is ~7x slower): (B * n_blocks, bs, Hkv, D) -> (B, S, Hkv, D) -> (B, Hkv, S, D)
        kb = k_cache.index_select(0, flat_blocks).view(b, -1, hkv, d).transpose(1, 2).to(q.dtype)
        vb = v_cache.index_select(0, flat_blocks).view(b, -1, hkv, d).transpose(1, 2).to(q.dtype)
        # GQA without repeating K/V: query head h reads kv head h // G, so the G query heads of kv
        # head j are G query rows against its keys: q (B, Hq, D) -> (B, Hkv, G, D).
        out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), kb, vb, attn_mask=mask, scale=scale)
        return out.reshape(b, hq, d)

    @staticmethod
    def _decode_index(meta: AttentionMetadata, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per step, shared by all layers: the (B * n_blocks,) blocks to gather, row-major per
        sequence (padding reads block 0 and is masked), and the (B, 1, 1, S) key-length mask."""
        if "decode_blocks" not in meta.derived:
            n_blocks = -(-meta.max_seqlen_k // block_size)
            blocks = meta.block_tables[:, :n_blocks].reshape(-1).long()
            key_pos = torch.arange(n_blocks * block_size, device=blocks.device)
            mask = key_pos[None, :] < meta.seq_lens[:, None].to(key_pos.dtype)
            meta.derived["decode_blocks"], meta.derived["decode_mask"] = blocks, mask[:, None, None, :]
        return meta.derived["decode_blocks"], meta.derived["decode_mask"]


# name -> factory. _LAZY names backends whose module is imported only when asked for (so "triton"
# costs nothing on CPU): "module:attribute" of a zero-argument factory (usually the class).
_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {"reference": ReferenceAttention}
_LAZY: dict[str, str] = {"triton": "shard.native.kernels.triton_attention:TritonAttention"}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _REGISTRY[name] = factory


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _REGISTRY and name in _LAZY:
        module, _, attr = _LAZY[name].partition(":")
        try:
            _REGISTRY[name] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise EngineConfigError(f"attention backend {name!r} is unavailable here: {e}") from e
    factory = _REGISTRY.get(name)
    if factory is None:
        known = sorted(set(_REGISTRY) | set(_LAZY))
        raise EngineConfigError(f"unknown attention backend {name!r}; known: {', '.join(known)}")
    return factory()
