"""Sizing the paged KV cache at Warmup.

CPU: a token budget (--kv-cache-tokens), by default enough for many full-length requests but never
more than a quarter of the machine's available memory.
CUDA: run the largest prefill the router will send against a throw-away cache to measure the
activation peak, then give the KV cache `kv_cache_fraction` of what is free after it.
Each rank plans for its own layers and kv heads (pipeline stages and uneven TP shards differ), then
all ranks keep the smallest count: the router hands out one set of block ids valid on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed

from shard.engine.types import WarmupSpec

if TYPE_CHECKING:
    from shard.native.engine import NativeEngine, RuntimeOptions

log = logging.getLogger(__name__)

CPU_DEFAULT_REQUESTS = 8  # full-length requests the default CPU budget holds


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_kv_blocks(
    *, engine: NativeEngine, spec: WarmupSpec, bytes_per_block: int, block_size: int, options: RuntimeOptions
) -> int:
    """Blocks of the KV cache, the same on every rank (Warmup runs on all ranks together)."""
    if options.kv_cache_tokens:
        return math.ceil(options.kv_cache_tokens / block_size)
    if engine.device.type != "cuda":
        want = CPU_DEFAULT_REQUESTS * (spec.max_total_tokens + block_size)
        cap = _available_host_bytes() // 4 // bytes_per_block
        local = int(min(math.ceil(want / block_size), cap))
    else:
        local = _plan_cuda(engine=engine, spec=spec, bytes_per_block=bytes_per_block, options=options)
    if engine.world_size == 1:
        return local
    fewest = torch.tensor([local], dtype=torch.int64, device=engine.device)
    torch.distributed.all_reduce(fewest, op=torch.distributed.ReduceOp.MIN)
    return int(fewest.item())


def graph_output_bytes(max_batch: int, vocab_size: int) -> int:
    """Memory the captured decode graphs keep after the KV cache is allocated: their one shared
    float32 (max_batch, vocab) logits buffer (cuda_graphs.GraphedDecode), e.g. 0.49 GiB for
    Llama-3.1-8B's vocabulary at 1,024 rows. Left out of the KV budget, it came out of the headroom
    the fraction leaves."""
    return max(0, max_batch) * vocab_size * 4


def _load_serving_kernels(engine: NativeEngine, scratch, ids: list[int]) -> None:
    """Runs the kernels and kernel variants serving uses that the warmup prefill did not, before
    free memory is measured. A kernel's first launch loads its module and can reserve local memory;
    after the KV cache has taken its share that failed with CUDA out-of-memory (fp32 Llama-3.1-8B
    shapes: the paged prefill kernel, which the one-sequence warmup prefill does not launch). It
    also keeps compiling and module loading off the request path: a batch shape first seen in
    serving stalled its prefill for ~2 s on an H100 (tests/gpu_jit_probe.py checks that no batch
    shape compiles anything after warmup). Same calls on every rank (pipeline stages pass hidden
    states inside the model)."""
    from shard.native.batch import build_prefill

    bs = engine.block_size
    n = max(1, min(bs - 1, len(ids) // 2))

    def run(new_tokens, prefix_lens, num_decode: int = 0) -> None:
        batch = build_prefill(
            new_tokens=new_tokens,
            prefix_lens=prefix_lens,
            # scratch blocks (their content is irrelevant): one per sequence of a batch, enough for
            # a lone sequence
            block_tables=(
                [[i] for i in range(len(new_tokens))]
                if len(new_tokens) > 1
                else [list(range(-(-(len(new_tokens[0]) + 1) // bs)))]
            ),
            all_logits=[False] * len(new_tokens),
            block_size=bs,
            device=engine.device,
            num_decode=num_decode,
        )
        logits = engine.model(batch, scratch)
        if engine.is_last_stage and logits is not None:
            engine.sampler.warm_up(logits)  # the greedy kernel at this many rows

    # two sequences, one with a one-token prefix: the varlen paged prefill kernel (fresh batches of
    # equal lengths take SDPA instead: triton_attention.prefill_route); n + 1 <= bs fits its block
    run([ids[:n], ids[-n:]], [1, 0])
    # The fresh equal-length shapes below take SDPA (cuDNN on an H100) at once, building their
    # graphs here: cuDNN's start-up rides on a process's first builds (~0.9 s each for the first
    # two), which serving would otherwise pay on a request (kernels/dense_plans.py).
    with _eager_dense_builds(engine):
        if len(ids) >= 16:  # 16 logits rows: the decode matmul's multiple-of-16 variant for the head
            run([[t] for t in ids[:16]], [0] * 16)
        if len(ids) >= 2:  # a mixed batch: two decode rows (the decode kernel outside the graphs), a prompt
            run([ids[:1], ids[1:2], ids[:n]], [1, 1, 0], num_decode=2)
        for length in (1, 16, 128, 1024):  # one sequence of each size class: the GEMMs' kernels load
            if length < len(ids):
                run([ids[:length]], [0])


def _eager_dense_builds(engine: NativeEngine) -> contextlib.AbstractContextManager[object]:
    """The attention backend's DensePlans.eager() when it has one (TritonAttention), else nothing."""
    layers = getattr(engine.model, "layers", None) or []
    plans = getattr(layers[0].self_attn.backend, "dense_plans", None) if len(layers) else None
    return plans.eager() if plans is not None else contextlib.nullcontext()


@torch.inference_mode()
def _plan_cuda(*, engine: NativeEngine, spec: WarmupSpec, bytes_per_block: int, options: RuntimeOptions) -> int:
    from shard.native.batch import build_prefill
    from shard.native.kv_cache import KVCache

    mc, bs = engine.mc, engine.block_size
    tokens = max(1, min(spec.max_batch_prefill_tokens, 32768))
    scratch_blocks = max(16, math.ceil((tokens + 1) / bs))  # _load_serving_kernels uses 16
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(engine.device)
    scratch = KVCache.allocate(
        num_layers=len(engine.model.layers),  # this pipeline stage's
        num_blocks=scratch_blocks,
        block_size=bs,
        num_kv_heads=engine.model.num_local_kv_heads,
        head_dim=mc.head_dim,
        dtype=engine.dtype,
        device=engine.device,
    )
    # One sequence of `tokens` random ids: the largest single prefill the router may send. Under
    # pipeline parallelism every stage runs it together (same T), passing hidden states along.
    ids = torch.randint(0, mc.vocab_size, (tokens,)).tolist()
    batch = build_prefill(
        new_tokens=[ids],
        prefix_lens=[0],
        block_tables=[list(range(scratch_blocks))],
        all_logits=[False],
        block_size=bs,
        device=engine.device,
    )
    engine.model(batch, scratch)
    _load_serving_kernels(engine, scratch, ids)
    torch.cuda.synchronize(engine.device)
    peak = torch.cuda.max_memory_allocated(engine.device)
    del scratch, batch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(engine.device)
    in_use = torch.cuda.memory_allocated(engine.device)
    activation_headroom = max(0, peak - in_use)
    graphs = graph_output_bytes(engine.graph_max_batch(spec), mc.vocab_size) if engine.is_last_stage else 0
    budget = int((free - activation_headroom - graphs) * options.kv_cache_fraction)
    log.info(
        "warmup prefill of %d tokens: peak %.2f GiB, free %.2f of %.2f GiB, decode graphs' logits %.2f GiB, "
        "KV budget %.2f GiB",
        tokens, peak / 2**30, free / 2**30, total / 2**30, graphs / 2**30, budget / 2**30,
    )
    return max(0, budget // bytes_per_block)
