"""Tensor parallelism as a transformation of a built LlamaForCausalLM (gpt-fast style).

Megatron layout: q/k/v and gate/up are column-parallel (each rank keeps a contiguous slice of
heads / intermediate features), o_proj and down_proj row-parallel followed by an all-reduce, the
lm_head vocab-parallel followed by an all-gather so every rank sees the full logits (sampling must
be identical on every rank). The embedding stays replicated.

Attention is split by KV-head groups (a kv head and the q heads that share it stay together) and
the split may be uneven: SmolLM2's 3 kv heads over 2 ranks give ranks 2 and 1 groups. Only the
all-gathered vocabulary needs equal parts (padded with zeros); row-parallel sums don't care.

apply_tensor_parallel works on a model whose parameters are on the meta device (the loader then
materializes only this rank's shard, using the same ShardSpecs) or already loaded in full (the
tensors are sliced in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from shard.engine.base import EngineConfigError
from shard.native.config import ModelConfig
from shard.native.fast_allreduce import RowParallelReduce

if TYPE_CHECKING:
    from shard.native.model import LlamaForCausalLM


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    group: object | None  # torch.distributed ProcessGroup; None when size == 1 (or the default group)

    @classmethod
    def single(cls) -> TPGroup:
        return cls(rank=0, size=1, group=None)


@dataclass(frozen=True)
class ShardSpec:
    dim: int | None  # dimension split across ranks; None = replicated
    # The dim is `units` equal chunks (kv-head groups, features) dealt out unevenly, never split;
    # None = split into equal parts of ceil(full / size), zero-padded (the vocabulary).
    units: int | None = None
    # A row-parallel bias: rank 0 keeps it, the others hold zeros (the all-reduce then adds it once).
    rank0_only: bool = False


REPLICATED = ShardSpec(dim=None)


def check_tensor_parallel(config: ModelConfig, tp: TPGroup) -> None:
    if tp.size < 1 or not 0 <= tp.rank < tp.size:
        raise EngineConfigError(f"invalid tensor-parallel rank {tp.rank} of {tp.size}")
    if config.num_heads % config.num_kv_heads:
        raise EngineConfigError(
            f"num_attention_heads={config.num_heads} is not a multiple of num_key_value_heads={config.num_kv_heads}"
        )
    if tp.size > config.num_kv_heads:
        raise EngineConfigError(
            f"tensor parallel size {tp.size} exceeds num_key_value_heads={config.num_kv_heads}: every shard needs "
            f"at least one kv head; use --num-shard {config.num_kv_heads} or fewer"
        )


def param_shard_spec(name: str, config: ModelConfig) -> ShardSpec:
    """How the model parameter `name` (LlamaForCausalLM naming) is split across ranks."""
    heads, features = config.num_kv_heads, config.intermediate_size
    if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
        return ShardSpec(dim=0, units=heads)
    if name.endswith("gate_up_proj.weight"):
        return ShardSpec(dim=0, units=features)
    if name == "lm_head.weight":
        return ShardSpec(dim=0)
    if name.endswith("o_proj.weight"):
        return ShardSpec(dim=1, units=heads)
    if name.endswith("down_proj.weight"):
        return ShardSpec(dim=1, units=features)
    if name.endswith("o_proj.bias"):
        return ShardSpec(dim=None, rank0_only=True)
    return REPLICATED


def unit_range(units: int, tp: TPGroup) -> tuple[int, int]:
    """[start, stop) of the units dealt to this rank: the first `units % size` ranks get one more."""
    base, extra = divmod(units, tp.size)
    start = tp.rank * base + min(tp.rank, extra)
    return start, start + base + (tp.rank < extra)


def shard_range(full: int, tp: TPGroup, units: int | None = None) -> tuple[int, int, int]:
    """(start, stop, local_len) of this rank's slice of `full` items. With `units`, whole units are
    dealt out unevenly and local_len == stop - start. Without, local_len = ceil(full / size) and
    the last ranks' slices may be short (stop - start < local_len): callers pad with zeros."""
    if units is not None:
        per = full // units
        u0, u1 = unit_range(units, tp)
        return u0 * per, u1 * per, (u1 - u0) * per
    local = -(-full // tp.size)
    start = min(tp.rank * local, full)
    return start, min(start + local, full), local


def shard_tensor(t: torch.Tensor, spec: ShardSpec, tp: TPGroup) -> torch.Tensor:
    """This rank's shard of the full tensor t (works on meta tensors too)."""
    if spec.rank0_only and tp.rank != 0:
        return torch.zeros_like(t)
    if spec.dim is None or tp.size == 1:
        return t
    start, stop, local = shard_range(t.shape[spec.dim], tp, spec.units)
    part = t.narrow(spec.dim, start, stop - start)
    if stop - start < local:
        pad_shape = list(t.shape)
        pad_shape[spec.dim] = local - (stop - start)
        part = torch.cat([part, t.new_zeros(pad_shape)], dim=spec.dim)
    return part


def _shard_param(module: nn.Module, attr: str, spec: ShardSpec, tp: TPGroup, sizes: list[int] | None) -> None:
    """Replaces module.<attr> by its shard; `sizes` splits a fused parameter into its parts along dim 0
    (each part is sharded on its own, then the shards are concatenated)."""
    full = getattr(module, attr).detach()
    parts = full.split(sizes, dim=0) if sizes else [full]
    local = torch.cat([shard_tensor(p, spec, tp) for p in parts], dim=0).clone()
    setattr(module, attr, nn.Parameter(local, requires_grad=False))


def apply_tensor_parallel(model: LlamaForCausalLM, tp: TPGroup) -> None:
    """Shards `model` in place for rank tp.rank of tp.size and installs the collectives."""
    config = model.config
    check_tensor_parallel(config, tp)
    if tp.size == 1:
        return
    # One reducer for the model: on CUDA, factory.py lets decode-sized forwards fuse the reduces
    # into the norms (model.tp_reduce.enable_fused) once the device and dtype are known.
    reduce = RowParallelReduce(tp.group)
    model.tp_reduce = reduce
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_sizes = [config.q_size, config.kv_size, config.kv_size]
        heads = ShardSpec(dim=0, units=config.num_kv_heads)
        _shard_param(attn.qkv_proj, "weight", heads, tp, qkv_sizes)
        if attn.qkv_proj.bias is not None:
            _shard_param(attn.qkv_proj, "bias", heads, tp, qkv_sizes)
        _shard_param(attn.o_proj, "weight", ShardSpec(dim=1, units=config.num_kv_heads), tp, None)
        if attn.o_proj.bias is not None:
            _shard_param(attn.o_proj, "bias", param_shard_spec("o_proj.bias", config), tp, None)
        kv0, kv1 = unit_range(config.num_kv_heads, tp)
        attn.num_kv_heads = kv1 - kv0
        attn.num_heads = attn.num_kv_heads * (config.num_heads // config.num_kv_heads)
        features = ShardSpec(dim=0, units=config.intermediate_size)
        _shard_param(mlp.gate_up_proj, "weight", features, tp, [config.intermediate_size] * 2)
        _shard_param(mlp.down_proj, "weight", ShardSpec(dim=1, units=config.intermediate_size), tp, None)
        f0, f1 = unit_range(config.intermediate_size, tp)
        mlp.intermediate_size = f1 - f0
        for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            linear.out_features, linear.in_features = linear.weight.shape
        attn.o_proj.register_forward_hook(_all_reduce_hook(reduce))
        mlp.down_proj.register_forward_hook(_all_reduce_hook(reduce))
    # Untie: the head becomes a vocab slice while the embedding stays whole.
    _shard_param(model.lm_head, "weight", ShardSpec(dim=0), tp, None)
    model.lm_head.out_features = model.lm_head.weight.shape[0]
    model.lm_head.register_forward_hook(_all_gather_hook(tp, config.vocab_size))


def _all_reduce_hook(reduce: RowParallelReduce):
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return reduce(output)  # partial sums of the row-parallel matmul

    return hook


def _all_gather_hook(tp: TPGroup, vocab_size: int):
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # output (L, V_local) -> (L, size * V_local) -> drop the zero rows padding an uneven vocab
        output = output.contiguous()
        parts = [torch.empty_like(output) for _ in range(tp.size)]
        dist.all_gather(parts, output, group=tp.group)
        return torch.cat(parts, dim=-1)[..., :vocab_size]

    return hook
