"""Decode steps at batch > 1 against the memory floor: weights once per step plus every sequence's
K/V, over the copy bandwidth measured in the same device call (bench/bandwidth.py).

    python -m bench.batch_ceiling ENGINE.json BANDWIDTH.json

For each batch of an engine_bench run: the mean context during its decode steps (input_len +
decode_steps / 2), the bytes one step must read at least (weights + batch x context x K/V bytes
per token), that over the measured bandwidth (the floor), and the measured p50 step time. At long
contexts the K/V term dominates, so this is the yardstick of the paged-attention kernel. Compute is
not counted (8B at batch 128: ~2 TFLOP per step, ~2 ms at the H100's nominal 989 TFLOP/s).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def rows(engine: dict[str, Any], bandwidth: dict[str, Any]) -> list[dict[str, float]]:
    bw = bandwidth["bandwidth"]["copy"]["bytes_per_s"]
    ceil = {c["context"]: c for c in bandwidth["ceilings"]}
    weights = ceil[0]["weights_bytes"]
    with_ctx = [c for c in bandwidth["ceilings"] if c["context"] > 0]
    kv_per_token = with_ctx[0]["kv_bytes"] / with_ctx[0]["context"]
    out = []
    for b in engine["batches"]:
        ctx = b["input_len"] + b["decode_steps"] / 2
        step_bytes = weights + b["batch"] * ctx * kv_per_token
        floor_ms = step_bytes / bw * 1e3
        measured = b["decode_step_ms"]["p50"]
        out.append({
            "batch": b["batch"], "mean_context": ctx, "bytes_per_step_gb": step_bytes / 1e9,
            "floor_ms": floor_ms, "measured_ms": measured, "fraction_of_floor": floor_ms / measured,
        })
    return out


def main(argv: list[str]) -> None:
    engine, bandwidth = (json.loads(open(p).read()) for p in argv[:2])
    print(f"{'batch':>5} {'context':>8} {'GB/step':>8} {'floor ms':>9} {'step ms':>8} {'floor/step':>10}")
    for r in rows(engine, bandwidth):
        print(f"{r['batch']:>5} {r['mean_context']:>8.0f} {r['bytes_per_step_gb']:>8.2f} {r['floor_ms']:>9.2f} "
              f"{r['measured_ms']:>8.2f} {100 * r['fraction_of_floor']:>9.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
