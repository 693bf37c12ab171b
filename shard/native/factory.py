"""NativeEngine's parts from a shard's configuration: the model (loaded, sharded for this rank's
TP/PP place), the runtime options, and this rank's place in the world."""

from __future__ import annotations

from typing import Any


def engine_parts(config, dist) -> dict[str, Any]:
    """Keyword arguments of NativeEngine(...). config: ShardConfig (shard/config.py), dist:
    DistContext (shard/dist.py)."""
    from shard.native.engine import RuntimeOptions
    from shard.native.loader import load_model, resolve_dtype
    from shard.native.pipeline import PPStage
    from shard.native.tp import TPGroup

    device = dist.device
    if device.type == "cuda":
        import torch

        # This runs on the engine thread (shard/server.py engine_thread), and CUDA's current
        # device is per thread: whatever uses the current device instead of a tensor's (the
        # symmetric-memory rendezvous, kernels launched at warmup) must see this rank's GPU.
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    tp = TPGroup(rank=dist.tp_rank, size=dist.tp_size, group=dist.tp_group)
    pp = PPStage(
        rank=dist.pp_rank, size=dist.pp_size, prev_rank=dist.pp_prev_rank, next_rank=dist.pp_next_rank
    )
    attention = None
    if device.type == "cuda":
        from shard.native.attention import get_attention_backend

        attention = get_attention_backend("triton")
    model, mc = load_model(
        config.model_id,
        dtype=dtype,
        device=device,
        tp=tp,
        pp=pp,
        load_format=config.load_format,
        cache_dir=config.cache_dir or None,
        attention=attention,
        seed=config.seed,
    )
    tp_reduce = getattr(model, "tp_reduce", None)
    if tp_reduce is not None and device.type == "cuda":
        # collective over the TP group: the reduces of decode-sized forwards fused into the norms
        tp_reduce.enable_fused(device, dtype, mc.hidden_size)
    options = RuntimeOptions(
        model_id=config.model_id,
        block_size=config.block_size,
        kv_cache_fraction=config.kv_cache_fraction,
        kv_cache_tokens=config.kv_cache_tokens,
        # Not under pipeline parallelism: capturing the stages' NCCL send/recv is possible but
        # not done here (each stage would capture its own half of every P2P pair).
        cuda_graphs=config.cuda_graphs and device.type == "cuda" and dist.pp_size == 1,
        max_total_tokens=config.max_total_tokens,
        overlap_decode=None if config.overlap_decode else False,
    )
    return dict(
        model=model,
        model_config=mc,
        options=options,
        device=device,
        dtype=dtype,
        tp_rank=dist.tp_rank,
        tp_size=dist.tp_size,
        pp_rank=dist.pp_rank,
        pp_size=dist.pp_size,
        world_size=dist.world_size,
    )
