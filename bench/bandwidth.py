"""The physical limit of batch-1 decode: measured memory bandwidth over the bytes read per token.

    python -m bench.bandwidth --config llama-3.1-8b --dtype bfloat16 --context 1024

Bandwidth: a large device-to-device copy (GPU, timed with CUDA events) or host memcpy (CPU, wall
clock), counting bytes read + bytes written, median of many repeats. On CPU a read-only pass
(a sum) is measured too, since a decode step mostly reads.

Bytes per token of batch-1 decode (what we count): every linear weight of every layer (q, k, v,
o, gate, up, down, with biases), both RMSNorm weights per layer, the final norm, and the full
lm_head (tied or not: computing all logits reads the whole matrix once). The token embedding is
a gather of one row, so only hidden_size elements count for it. KV: K and V of every layer for
`context` earlier tokens. Activations, the sampler and kernel launch costs are not counted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import format_table, machine_facts, write_results

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_hf_config(spec: str) -> dict[str, Any]:
    """A config.json path, a folder holding one, a .gguf file (its metadata, through transformers)
    or a bundled name (shard/native/configs/<name>.json)."""
    path = Path(spec)
    if path.suffix == ".gguf":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        path = Path(__file__).resolve().parent.parent / "shard" / "native" / "configs" / f"{spec}.json"
    return json.loads(path.read_text())


def bytes_per_token(
    config: dict[str, Any], *, dtype_bytes: int, context: int, tp_size: int = 1
) -> dict[str, int]:
    """Bytes one batch-1 decode step reads (see the module docstring), per rank when tp_size > 1
    (linear weights and KV split evenly; norms and the embedding row are replicated)."""
    h = config["hidden_size"]
    i = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    q, kv = heads * head_dim, kv_heads * head_dim
    qkv_bias = config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False))
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if qkv_bias else 0)
    if config.get("attention_bias", False) and config.get("model_type") != "qwen2":
        attn += h  # llama's attention_bias also biases o_proj
    mlp = 3 * h * i
    linear_params = layers * (attn + mlp) + vocab * h  # + lm_head
    replicated_params = layers * 2 * h + h + h  # norms, final norm, one embedding row
    weights = (linear_params // tp_size + replicated_params) * dtype_bytes
    kv_bytes = 2 * layers * kv * context * dtype_bytes // tp_size
    return {"weights": weights, "kv": kv_bytes, "total": weights + kv_bytes}


def decode_ceiling(bandwidth_bytes_per_s: float, bytes_per_step: int) -> float:
    """Batch-1 decode tokens/s if every step only streamed `bytes_per_step` at full bandwidth."""
    return bandwidth_bytes_per_s / bytes_per_step


def measure_copy_bandwidth(*, device: str, nbytes: int, repeats: int) -> dict[str, float]:
    """Median bandwidth (bytes/s, read + written) of copying an `nbytes` buffer into another."""
    import torch

    n = nbytes // 4
    src = torch.randn(n, device=device)  # never time on zeros
    dst = torch.empty_like(src)
    times = _time(lambda: dst.copy_(src), device=device, repeats=repeats)
    return _bw_stats(times, 2 * n * 4)


def measure_read_bandwidth(*, device: str, nbytes: int, repeats: int) -> dict[str, float]:
    """Median bandwidth (bytes/s, read only) of summing an `nbytes` buffer."""
    import torch

    src = torch.randn(nbytes // 4, device=device)
    times = _time(lambda: src.sum(), device=device, repeats=repeats)
    return _bw_stats(times, src.numel() * 4)


def _time(fn, *, device: str, repeats: int) -> list[float]:
    import time

    import torch

    for _ in range(3):  # warm up: allocator, page faults, clocks
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return times
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _bw_stats(times: list[float], nbytes: int) -> dict[str, float]:
    from bench.common import percentile

    return {
        "bytes": nbytes,
        "median_s": percentile(times, 50),
        "bytes_per_s": nbytes / percentile(times, 50),
        "best_bytes_per_s": nbytes / min(times),
        "repeats": len(times),
    }


def measure(*, device: str, nbytes: int, repeats: int) -> dict[str, Any]:
    out = {"device": device, "copy": measure_copy_bandwidth(device=device, nbytes=nbytes, repeats=repeats)}
    if not device.startswith("cuda"):
        out["read"] = measure_read_bandwidth(device=device, nbytes=nbytes, repeats=repeats)
    return out


def ceilings(
    bw: dict[str, Any], config: dict[str, Any], *, dtype: str, contexts: list[int], tp_size: int = 1
) -> list[dict]:
    rows = []
    for ctx in contexts:
        b = bytes_per_token(config, dtype_bytes=DTYPE_BYTES[dtype], context=ctx, tp_size=tp_size)
        row = {
            "context": ctx,
            **{f"{k}_bytes": v for k, v in b.items()},
            "ceiling_tok_s_copy_bw": decode_ceiling(bw["copy"]["bytes_per_s"], b["total"]),
        }
        if "read" in bw:
            row["ceiling_tok_s_read_bw"] = decode_ceiling(bw["read"]["bytes_per_s"], b["total"])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bandwidth", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama-3.1-8b", help="config.json, folder, or bundled config name")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--context", default="0,1024", help="comma-separated context lengths for the KV term")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--gib", type=float, default=0.0, help="buffer size in GiB (default: 2 on GPU, 0.5 on CPU)"
    )
    p.add_argument("--repeats", type=int, default=0, help="default: 50 on GPU, 10 on CPU")
    p.add_argument(
        "--out", default=None, help="results JSON path (default bench/results/bandwidth-<card>-<date>.json)"
    )
    args = p.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device.startswith("cuda")
    nbytes = int((args.gib or (2.0 if gpu else 0.5)) * 2**30)
    bw = measure(device=device, nbytes=nbytes, repeats=args.repeats or (50 if gpu else 10))
    config = load_hf_config(args.config)
    contexts = [int(c) for c in args.context.split(",")]
    rows = ceilings(bw, config, dtype=args.dtype, contexts=contexts, tp_size=args.tp_size)
    payload = {
        "benchmark": "bandwidth",
        "machine": machine_facts(),
        "params": vars(args),
        "bandwidth": bw,
        "ceilings": rows,
    }
    path = write_results(payload, name="bandwidth", out=args.out)
    print(f"copy bandwidth on {device}: {bw['copy']['bytes_per_s'] / 1e9:.1f} GB/s (read+write, median)")
    if "read" in bw:
        print(f"read bandwidth on {device}: {bw['read']['bytes_per_s'] / 1e9:.1f} GB/s (sum, median)")
    print(
        format_table(
            ["context", "weights GB", "kv GB", "ceiling tok/s"],
            [
                [r["context"], r["weights_bytes"] / 1e9, r["kv_bytes"] / 1e9, r["ceiling_tok_s_copy_bw"]]
                for r in rows
            ],
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
