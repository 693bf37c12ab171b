"""Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2) over the paged KV cache.

Single-device by design: tensor parallelism is a transformation applied after construction
(tp.py shrinks the linears to one rank's shard and installs the collectives), gpt-fast style, and
so is pipeline parallelism (pipeline.py keeps a slice of the layers and swaps the ends for send/recv).
Numerics follow transformers' LlamaForCausalLM: RMSNorm in float32 then cast, RoPE with the
rotate_half convention and cos/sin computed in float32 from positions, SwiGLU.

q/k/v and gate/up are fused into one linear each (qkv_proj, gate_up_proj); `hf_names` says which
Hugging Face tensors make up each parameter, in concatenation order (dim 0).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shard.native.attention import AttentionBackend, ReferenceAttention
from shard.native.config import ModelConfig
from shard.native.forward import AttentionMetadata, ForwardBatch
from shard.native.kv_cache import KVCache

# Rows up to which Linear uses the skinny kernel (<= shard/native/kernels/skinny.py MAX_ROWS):
# SHARD_SKINNY_MAX_ROWS, 0 = cuBLAS always
SKINNY_MAX_ROWS = min(int(os.environ.get("SHARD_SKINNY_MAX_ROWS", "16")), 16)

# fused parameter -> the Hugging Face projections concatenated (dim 0) into it, in order
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class Linear(nn.Linear):
    # oneDNN-packed weight (CPU, float32; cpu_linear.pack_linears), used instead of `weight` once set
    packed: torch.Tensor | None = None
    # CUDA bf16/fp16: inputs of at most skinny.MAX_ROWS rows (decode) go through the Triton
    # weight-streaming kernel (enable_fused_kernels; SHARD_SKINNY_MAX_ROWS=0 keeps cuBLAS)
    skinny: bool = False

    def reset_parameters(self) -> None:
        """No init: the loader fills every weight (and torch's init costs seconds of lazy imports)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            from shard.native.cpu_linear import packed_linear

            return packed_linear(x, self.packed, self.bias)
        if self.skinny and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS and x.stride(-1) == 1:
            from shard.native.kernels.skinny import skinny_matmul

            return skinny_matmul(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        """No init: the loader fills every weight."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        self.fused = False  # one Triton kernel instead of ~6 eager ones (CUDA; enable_fused_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from shard.native.kernels.norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # As transformers: normalize in float32, cast back, then scale (the order matters in bf16).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    dim = config.head_dim
    # Always on CPU (also when the model is built under torch.device("meta")); callers move it.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    if scaling["rope_type"] == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, blended, scaled)
    raise AssertionError(f"unvalidated rope type {scaling['rope_type']}")  # config.py refuses others


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_inv_freq(self, device: torch.device) -> None:
        """Recomputes the buffer on `device` (needed after building on the meta device and to_empty)."""
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryEmbedding:
        # model.to(dtype) / to_empty would cast or blank the buffer: frequencies stay float32 and
        # exact (a bf16 inv_freq shifts the rotation angle by whole radians at long positions).
        super()._apply(fn, recurse)
        self.reset_inv_freq(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin of every position, (max_position_embeddings, D/2), for the fused kernel.
        Built once per device; the rotation then costs no per-step trigonometry."""
        cached = getattr(self, "_tables", None)
        if cached is None or cached[0].device != self.inv_freq.device:
            pos = torch.arange(self.config.max_position_embeddings, device=self.inv_freq.device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq.float()[None, :]
            cached = (freqs.cos().contiguous(), freqs.sin().contiguous())
            self._tables = cached
        return cached


@dataclass
class Rope:
    """This step's rotation: per-token cos/sin (T, D) for the eager path, or (positions set) the
    (max_positions, D/2) tables the fused kernel indexes by position."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None = None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D); cos/sin (T, D). rotate_half convention: pairs are (i, i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, *, dtype: torch.dtype | None) -> None:
        super().__init__()
        # Head counts are this rank's (tp.py divides them); head_dim never changes.
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        out = config.q_size + 2 * config.kv_size
        self.qkv_proj = Linear(config.hidden_size, out, bias=config.attention_bias, dtype=dtype)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=config.o_proj_bias, dtype=dtype)
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        rope: Rope,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # strided views into the qkv output
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if rope.positions is not None:
            from shard.native.kernels.rotary import apply_rotary_

            apply_rotary_(q, k, rope.positions, rope.cos, rope.sin)  # in place, one launch
        else:
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        o = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)  # (T, Hq, D)
        return self.o_proj(o.reshape(t, q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size  # this rank's share after tp.py
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False, dtype=dtype)
        self.fused = False  # silu(gate) * up in one Triton kernel (enable_fused_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from shard.native.kernels.activation import silu_mul

            return self.down_proj(silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))  # in place: one (T, I) temporary fewer


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, *, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, backend, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype)
        # residual adds fused into the norms after them (enable_fused_kernels; forward_fused)
        self.fused = False

    def forward(
        self,
        h: torch.Tensor,  # (T, hidden) residual stream; the fused path updates it in place
        rope: Rope,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if self.fused:
            h, pending = self.forward_fused(h, None, rope, k_cache, v_cache, meta)
            return h + pending
        a = self.self_attn(self.input_layernorm(h), rope, k_cache, v_cache, meta)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_fused(
        self,
        h: torch.Tensor,  # (T, hidden) residual stream, updated in place
        pending: torch.Tensor | None,  # the previous layer's MLP output, not yet added to h
        rope: Rope,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        add_rms_norm: AddNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (h, this layer's MLP output). Every residual add happens inside the norm kernel
        that follows it (the next layer's input norm, or the model's final norm), so a layer is
        two norm launches and no add: h += pending; x = norm(h); h += attn(x); x = norm(h).
        add_rms_norm: the tensor-parallel reducer's, which may also sum the ranks' partial outputs
        (fast_allreduce.py); norm.add_rms_norm by default."""
        from shard.native.kernels.norm import rms_norm

        if add_rms_norm is None:
            from shard.native.kernels.norm import add_rms_norm
        n_in, n_post = self.input_layernorm, self.post_attention_layernorm
        if pending is None:
            x = rms_norm(h, n_in.weight, n_in.eps)
        else:
            x, h = add_rms_norm(pending, h, n_in.weight, n_in.eps)
        a = self.self_attn(x, rope, k_cache, v_cache, meta)
        x, h = add_rms_norm(a, h, n_post.weight, n_post.eps)
        return h, self.mlp(x)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        attention: AttentionBackend | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Parameters are uninitialized; the loader fills them (build under torch.device("meta")
        to allocate nothing until the loader materializes this rank's shard)."""
        super().__init__()
        self.config = config
        backend = attention if attention is not None else ReferenceAttention()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend, dtype=dtype) for _ in range(config.num_layers)
        )
        self.fused_rope = False  # rotary through the Triton kernel (enable_fused_kernels)
        self.layer_offset = 0  # index of layers[0] in the whole model (a pipeline stage keeps a slice)
        # None on an earlier pipeline stage (pipeline.py): it hands its hidden states on instead.
        self.norm: RMSNorm | None = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head: Linear | None = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # tp.py unties when it shards the head

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this rank caches (the KVCache's num_kv_heads)."""
        return self.layers[0].self_attn.num_kv_heads

    def enable_fused_kernels(self) -> None:
        """CUDA only: Triton RMSNorm (+ residual add) and in-place rotary instead of eager chains of
        small kernels (a decode step at batch 1 spent ~2 ms of ~8 in them on an H100)."""
        self.fused_rope = True
        skinny = SKINNY_MAX_ROWS > 0
        for module in self.modules():
            if isinstance(module, (RMSNorm, DecoderLayer, MLP)):
                module.fused = True
            if skinny and isinstance(module, Linear):
                w = module.weight
                module.skinny = (
                    module.bias is None and w.dtype in (torch.bfloat16, torch.float16) and w.is_contiguous()
                )

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        for layer in self.layers:
            layer.self_attn.backend = backend

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits (len(batch.logits_indices), vocab_size), the full vocabulary on every rank;
        written into `logits_out` when given (a CUDA graph's static output: the bf16 -> float32
        conversion writes there instead of into a new tensor) and returned.

        A model without a head (an earlier pipeline stage) returns the (T, hidden) hidden states of
        every token instead. kv_cache holds this model's layers only (layer i at index i)."""
        meta = AttentionMetadata.from_batch(batch)
        h = self.embed_tokens(batch.input_ids)  # (T, hidden); a later pipeline stage receives it
        if self.fused_rope:
            rope = Rope(*self.rotary_emb.tables(), positions=batch.positions)
        else:
            rope = Rope(*self.rotary_emb(batch.positions, h.dtype))
        if self.fused_rope:  # the fused path: residual adds ride in the norm kernels
            return self._forward_fused(h, rope, kv_cache, meta, batch.logits_indices, logits_out)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, kv_cache.k[i], kv_cache.v[i], meta)
        if self.lm_head is None or self.norm is None:
            return h
        # Norm is per row, so only the rows that need logits are normalized and projected.
        h = self.norm(h[batch.logits_indices])
        return _to_float(self.lm_head(h), logits_out)

    def _forward_fused(
        self, h: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: AttentionMetadata, rows: torch.Tensor,
        logits_out: torch.Tensor | None,
    ) -> torch.Tensor:
        from shard.native.kernels.norm import add_rms_norm

        # Tensor parallel: the row-parallel reduces may ride in the norms (fast_allreduce.py). Not
        # on a pipeline stage without the head: its last reduce would have no norm to ride in.
        reduce = getattr(self, "tp_reduce", None)
        if reduce is None or self.lm_head is None or self.norm is None:
            pending = None
            for i, layer in enumerate(self.layers):
                h, pending = layer.forward_fused(h, pending, rope, kv_cache.k[i], kv_cache.v[i], meta)
            if pending is None:  # a stage without layers
                pending = torch.zeros_like(h)
            if self.lm_head is None or self.norm is None:
                return h + pending
            x, _ = add_rms_norm(pending[rows], h[rows], self.norm.weight, self.norm.eps)
            return _to_float(self.lm_head(x), logits_out)
        with reduce.forward(h.shape[0], h.dtype) as add_norm:
            pending = None
            for i, layer in enumerate(self.layers):
                h, pending = layer.forward_fused(h, pending, rope, kv_cache.k[i], kv_cache.v[i], meta, add_norm)
            if pending is None:
                pending = torch.zeros_like(h)
            x, _ = add_norm(pending[rows], h[rows], self.norm.weight, self.norm.eps)
        return _to_float(self.lm_head(x), logits_out)

    def hf_names(self, name: str) -> list[str]:
        """Hugging Face tensors making up parameter `name`, in dim-0 concatenation order."""
        if name == "lm_head.weight":
            return ["model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"]
        if name.startswith("layers."):  # local layer index -> the checkpoint's
            index, _, rest = name.removeprefix("layers.").partition(".")
            name = f"layers.{int(index) + self.layer_offset}.{rest}"
        module_path, _, leaf = name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        parts = PACKED_MODULES.get(module, (module,))
        prefix = f"model.{parent}." if parent else "model."
        return [f"{prefix}{p}.{leaf}" for p in parts]


# (x, residual, weight, eps) -> (rmsnorm(residual + x) * weight, residual updated in place)
AddNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def _to_float(logits: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """(rows, vocab) logits as float32: a new tensor, or written into `out`."""
    if out is None:
        return logits.float()
    return out.copy_(logits)
