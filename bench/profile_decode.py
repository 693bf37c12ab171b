"""Where a decode step's time goes, in-process (no gRPC): the engine's step with and without CUDA
graphs, the bare graph replay, and a kernel table from torch.profiler (eager). One GPU.

    python3 -m bench.profile_decode [--model llama-3.1-8b] [--batch 1] [--context 128]
        [--prefill-sort cuda_time_total]
"""

from __future__ import annotations

import argparse
import time

import torch

from shard.engine.types import NewRequest, SamplingParams, StoppingParams, WarmupSpec
from shard.native.attention import get_attention_backend
from shard.native.engine import NativeEngine, RuntimeOptions
from shard.native.loader import load_model
from shard.native.tp import TPGroup


def engine(model, mc, graphs: bool) -> NativeEngine:
    eng = NativeEngine(model=model, model_config=mc, device=torch.device("cuda"), dtype=torch.bfloat16,
                       options=RuntimeOptions(model_id="p", block_size=16, kv_cache_tokens=1 << 17,
                                              cuda_graphs=graphs))
    eng.warmup(WarmupSpec(max_input_tokens=2048, max_total_tokens=4096, max_batch_prefill_tokens=4096,
                          max_batch_size=256))
    return eng


def start(eng: NativeEngine, batch: int, context: int, steps: int) -> float:
    per = -(-(context + steps + 2) // 16)
    reqs = [NewRequest(id=i + 1, input_ids=tuple(range(100, 100 + context)), sampling=SamplingParams(),
                       stopping=StoppingParams(max_new_tokens=steps + 1, ignore_eos_token=True),
                       blocks=tuple(range(i * per, (i + 1) * per))) for i in range(batch)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.prefill(reqs)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def step_ms(eng: NativeEngine, n: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        eng.decode({}, 1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prefill-sort", default="cpu_time_total",
                    help="the prefill kernel table's order (cuda_time_total: where its GPU time goes)")
    args = ap.parse_args()
    model, mc = load_model(args.model, dtype=torch.bfloat16, device=torch.device("cuda"), tp=TPGroup.single(),
                           load_format="dummy", attention=get_attention_backend("triton"))
    for graphs in (True, False):
        eng = engine(model, mc, graphs)
        start(eng, args.batch, args.context, 80)  # warm the kernels
        eng.clear()
        pre = start(eng, args.batch, args.context, 80)
        step_ms(eng, 5)
        ms = step_ms(eng, 40)
        print(f"graphs={graphs}: prefill {args.batch}x{args.context} {pre * 1e3:.2f} ms; decode step {ms:.3f} ms "
              f"= {args.batch / ms * 1e3:.1f} tok/s")
        if graphs:
            batch = eng._decode_batch.forward_batch()  # noqa: SLF001
            for _ in range(3):
                eng._graphs(batch)  # noqa: SLF001
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                eng._graphs(batch)  # noqa: SLF001
            e1.record()
            torch.cuda.synchronize()
            print(f"  bare graph replay: {e0.elapsed_time(e1) / 20:.3f} ms")
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step_ms(eng, 3)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
            eng.clear()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start(eng, args.batch, args.context, 4)
            print(prof.key_averages().table(sort_by=args.prefill_sort, row_limit=18, max_name_column_width=60))
        eng.shutdown()
        del eng
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
