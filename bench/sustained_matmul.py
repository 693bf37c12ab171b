"""Matmul throughput held for seconds, per dtype, with the card's SM clock and power meanwhile: a
short benchmark (triton's do_bench, a profile of a few calls) sees the card before its power cap
bites; a max-load level does not. One GPU.

    python3 -m bench.sustained_matmul [--seconds 6] [--out F.json]

Per dtype (bf16, fp16), the prefill's largest projection at max load (16,384 tokens x 4,096 ->
28,672: Llama-3.1-8B's gate_up) back to back for --seconds; TFLOP/s over the second half, with
NVML's SM clock, power draw and throttle reasons sampled every 100 ms over the same half. Operands
are random like the engine's dummy weights (weights N(0, 0.02), activations N(0, 1)): a tensor
core's power depends on its operands' bits, so zeros would flatter it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from bench.common import machine_facts

M, K, N = 16384, 4096, 28672


def _sampler(stop: threading.Event, out: list[tuple[float, int, float, int]]) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML here: throughput alone
        return
    h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    while not stop.is_set():
        out.append((
            time.perf_counter(),
            pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
            reasons(h),
        ))  # fmt: skip
        time.sleep(0.1)


def run(dtype: torch.dtype, seconds: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn((M, K), device="cuda", dtype=dtype, generator=g)
    w = (0.02 * torch.randn((N, K), device="cuda", generator=g)).to(dtype)
    out = torch.empty((M, N), device="cuda", dtype=dtype)
    torch.mm(a, w.t(), out=out)
    torch.cuda.synchronize()
    samples: list[tuple[float, int, float, int]] = []
    stop = threading.Event()
    thread = threading.Thread(target=_sampler, args=(stop, samples), daemon=True)
    thread.start()
    start = time.perf_counter()
    half, calls_half, t_half = start + seconds / 2, 0, 0.0
    while True:
        for _ in range(10):
            torch.mm(a, w.t(), out=out)
        torch.cuda.synchronize()
        now = time.perf_counter()
        if now >= half:
            if not t_half:
                t_half = now
            else:
                calls_half += 10
        if now - start >= seconds:
            break
    stop.set()
    thread.join()
    elapsed = time.perf_counter() - t_half
    late = [s for s in samples if s[0] >= t_half]
    tflops = 2.0 * M * K * N * calls_half / elapsed / 1e12
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "tflops": tflops,
        "sm_clock_mhz_mean": sum(s[1] for s in late) / max(1, len(late)),
        "power_w_mean": sum(s[2] for s in late) / max(1, len(late)),
        "power_cap_share": sum(bool(s[3] & 0x4) for s in late) / max(1, len(late)),  # SW power cap
        "samples": len(late),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results = []
    for dtype in (torch.bfloat16, torch.float16, torch.bfloat16, torch.float16):  # twice, alternating
        r = run(dtype, args.seconds)
        results.append(r)
        print(
            f"{r['dtype']:>8}: {r['tflops']:.0f} TFLOP/s held, SM {r['sm_clock_mhz_mean']:.0f} MHz, "
            f"{r['power_w_mean']:.0f} W, power-capped {100 * r['power_cap_share']:.0f}% of samples",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine_facts(), "shape": [M, K, N], "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
