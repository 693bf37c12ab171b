"""Where a max-load prefill's GPU time goes, in-process (no gRPC), and each of its matmul shapes
alone against the card's measured matmul rate. One GPU.

    python3 -m bench.profile_prefill [--model llama-3.1-8b] [--batch 8] [--context 2048] [--out F.json]

Prints (and writes as JSON) the prefill's wall time per call over a few calls, torch.profiler's
kernel time by kind (matmul, attention, norm, activation, rotary, K/V store, other), each kind's
share, and the matmuls' achieved TFLOP/s from their FLOPs (2 * tokens * K * N per projection,
the layers' shapes) -- then each projection's shape timed alone, to tell a slow shape from a slow
card (power-limited clocks under a long run show up as every shape being slow).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from bench.common import machine_facts
from shard.engine.types import NewRequest, SamplingParams, StoppingParams, WarmupSpec
from shard.native.attention import get_attention_backend
from shard.native.engine import NativeEngine, RuntimeOptions
from shard.native.loader import load_model
from shard.native.tp import TPGroup

# Kernel name fragments -> kind (first match wins; lower-case).
KINDS = (
    ("attention", ("attn", "flash", "fmha", "cudnn", "sdpa", "_prefill_kernel", "decode_kernel")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "skinny")),
    ("norm", ("rms", "norm")),
    ("activation", ("silu", "act_and_mul")),
    ("rotary", ("rotary", "rope")),
    ("kv store", ("store_kv", "index_copy", "scatter")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, frags in KINDS:
        if any(f in low for f in frags):
            return kind
    return "other"


def requests(batch: int, context: int, first_id: int, first_seq: int = 0) -> list[NewRequest]:
    per = -(-(context + DECODE_STEPS + 8) // 16)
    return [
        NewRequest(
            id=first_id + i,
            input_ids=tuple((7 * i + j) % 30000 + 100 for j in range(context)),
            sampling=SamplingParams(),
            stopping=StoppingParams(max_new_tokens=DECODE_STEPS + 4, ignore_eos_token=True),
            blocks=tuple(range((first_seq + i) * per, (first_seq + i + 1) * per)),
        )
        for i in range(batch)
    ]


DECODE_STEPS = 16


def kernel_kinds(prof) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """GPU ms by kind, and (ms, name) per kernel, from a torch.profiler run."""
    by_kind: dict[str, float] = defaultdict(float)
    top: list[tuple[float, str]] = []
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if us > 0:
            by_kind[kind_of(ev.key)] += us / 1e3
            top.append((us / 1e3, ev.key[:90]))
    return by_kind, sorted(top, reverse=True)


def profile_decode(eng: NativeEngine, n: int, group: int, context: int) -> dict[str, float]:
    """Kernel ms per decode step by kind, at n sequences of `context` tokens."""
    from torch.profiler import ProfilerActivity, profile

    for g in range(0, n, group):
        eng.prefill(requests(min(group, n - g), context, 500_000 + g, first_seq=g))
    for _ in range(3):
        eng.decode({}, 1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(DECODE_STEPS - 8):
            eng.decode({}, 1)
        torch.cuda.synchronize()
    by_kind, top = kernel_kinds(prof)
    steps = DECODE_STEPS - 8
    total = sum(by_kind.values()) / steps
    print(f"decode {n} x {context}: kernel ms per step {total:.2f}")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<11} {ms / steps:8.3f} ms  {100 * ms / steps / total:5.1f}%")
    for ms, name in top[:8]:
        print(f"  {ms / steps:8.3f}  {name}")
    eng.clear()
    return {k: v / steps for k, v in by_kind.items()}


def run_prefill(eng: NativeEngine, batch: int, context: int, first_id: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.prefill(requests(batch, context, first_id))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    eng.clear()
    return dt


def matmul_shapes(mc) -> dict[str, tuple[int, int, int]]:
    """(K, N, per-layer count) of each projection; the head runs on one row per sequence only."""
    h, d = mc.hidden_size, mc.head_dim
    qkv = (mc.num_heads + 2 * mc.num_kv_heads) * d
    return {
        "qkv": (h, qkv, 1),
        "o": (mc.num_heads * d, h, 1),
        "gate_up": (h, 2 * mc.intermediate_size, 1),
        "down": (mc.intermediate_size, h, 1),
    }


def time_mm(m: int, k: int, n: int, reps: int = 20) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ w.t()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        a @ w.t()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument(
        "--decode-batch",
        type=int,
        default=0,
        help="also profile decode steps of this many sequences at --context (prefilled --batch at a time)",
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    tokens = args.batch * args.context
    model, mc = load_model(
        args.model,
        dtype=torch.bfloat16,
        device=torch.device("cuda"),
        tp=TPGroup.single(),
        load_format="dummy",
        attention=get_attention_backend("triton"),
    )
    eng = NativeEngine(
        model=model,
        model_config=mc,
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        options=RuntimeOptions(
            model_id="p",
            block_size=16,
            kv_cache_tokens=max(args.batch, args.decode_batch) * (args.context + DECODE_STEPS + 24),
            cuda_graphs=False,
        ),
    )
    eng.warmup(
        WarmupSpec(
            max_input_tokens=args.context,
            max_total_tokens=args.context + DECODE_STEPS + 8,
            max_batch_prefill_tokens=tokens,
            max_batch_size=max(args.batch, args.decode_batch),
        )
    )
    walls = [run_prefill(eng, args.batch, args.context, 1000 * (i + 1)) for i in range(args.calls)]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_prefill(eng, args.batch, args.context, 99_000)
    by_kind, top = kernel_kinds(prof)
    gpu_ms = sum(by_kind.values())
    flops = {name: 2 * tokens * k * n * c * mc.num_layers for name, (k, n, c) in matmul_shapes(mc).items()}
    mm_tflops = sum(flops.values()) / (by_kind["matmul"] / 1e3) / 1e12 if by_kind["matmul"] else 0.0
    print(
        f"prefill {args.batch}x{args.context} ({tokens} tokens): wall ms per call "
        + " ".join(f"{w * 1e3:.1f}" for w in walls)
    )
    print(f"profiled GPU time {gpu_ms:.1f} ms; matmuls at {mm_tflops:.0f} TFLOP/s")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<11} {ms:8.2f} ms  {100 * ms / gpu_ms:5.1f}%")
    print("top kernels (ms):")
    for ms, name in top[:14]:
        print(f"  {ms:8.2f}  {name}")
    decode = profile_decode(eng, args.decode_batch, args.batch, args.context) if args.decode_batch else {}
    eng.shutdown()
    del eng, model
    torch.cuda.empty_cache()
    alone = {}
    for name, (k, n, _) in matmul_shapes(mc).items():
        s = time_mm(tokens, k, n)
        alone[name] = {"ms": s * 1e3, "tflops": 2 * tokens * k * n / s / 1e12}
        print(
            f"  alone {name:<8} M={tokens} K={k} N={n}: {s * 1e3:7.3f} ms  {alone[name]['tflops']:.0f} TFLOP/s"
        )
    sq = time_mm(8192, 8192, 8192)
    print(f"  alone 8192^3: {2 * 8192**3 / sq / 1e12:.0f} TFLOP/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "machine": machine_facts(),
                    "batch": args.batch,
                    "context": args.context,
                    "wall_ms": [w * 1e3 for w in walls],
                    "kind_ms": by_kind,
                    "matmul_tflops": mm_tflops,
                    "top": top[:40],
                    "decode_kind_ms_per_step": decode,
                    "alone": alone,
                    "square_tflops": 2 * 8192**3 / sq / 1e12,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
