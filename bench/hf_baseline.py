"""Baseline: Hugging Face transformers `generate` with static batching, same weights and hardware.

    python -m bench.hf_baseline --model llama-3.1-8b --batch-sizes 1,16,64      # GPU, dummy weights
    python -m bench.hf_baseline --model path/to/SmolLM2.gguf --device cpu

Model: a .gguf file or a safetensors folder (transformers' own loaders), or a config (bundled name,
config .json, folder with only config.json): then the exact dummy weights the engine draws
(shard/native/loader.py dummy_tensor, same seed and device type) are copied into transformers'
model. Prompts are random token ids of exact length, no padding. Greedy, min_new_tokens =
max_new_tokens so every sequence has exactly the asked length. Eager PyTorch (no torch.compile),
sdpa attention, dynamic KV cache unless --static-cache.

Per batch size B with input I and output N, each generate(max_new_tokens=N) timestamps every
token step through a streamer (medians over --runs): prefill t1 = call -> first token step;
decode tok/s = B*(N-1)/(tN - t1) with tN the last step; output tok/s = B*N/total; step_ms: every
decode step's latency (p50/p99). Taking t1 and tN in the same call keeps a slow outlier call
from skewing the difference.
Serving presets (--presets, --preset-batches): one static batch of the concurrency size per
preset, output tok/s = B*OUT/t (what a static-batching server would reach at that load).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from bench.common import format_table, machine_facts, parse_int_list, percentile, summarize, write_results


def build_model(spec: str, *, device: str, dtype: Any, seed: int) -> tuple[Any, int, str]:
    """(model, vocab_size, how the weights were made)."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        return model.to(device).eval(), model.config.vocab_size, "gguf (transformers' dequantization)"
    if path.is_dir() and any(path.glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval(), model.config.vocab_size, "safetensors"
    from shard.native.config import ModelConfig
    from shard.native.loader import dummy_tensor, resolve_model_source

    _, cfg_path = resolve_model_source(spec, "dummy")
    mc = ModelConfig.from_json_file(cfg_path if cfg_path.is_file() else cfg_path / "config.json")
    hf_dict = mc.to_hf_dict()
    config = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head is listed once, as the embedding
            param.copy_(dummy_tensor(name, tuple(param.shape), seed=seed, dtype=dtype, device=device))
    return model.eval(), mc.vocab_size, f"dummy (engine's dummy_tensor, seed {seed}, drawn on {device})"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _TokenClock:
    """A generate() streamer that only timestamps: put() is called once with the prompt, then once
    per step with that step's tokens (after a device sync, since it moves them to the host)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(
    model: Any, ids: Any, *, new_tokens: int, device: str, static_cache: bool
) -> tuple[float, list[float]]:
    """One generate() of exactly `new_tokens` tokens per sequence: (total seconds, the time each
    token step arrived, measured from the call)."""
    import torch

    kwargs: dict[str, Any] = {"cache_implementation": "static"} if static_cache else {}
    clock = _TokenClock()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=clock,
            **kwargs,
        )
    _sync(device)
    total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens, (out.shape, ids.shape, new_tokens)
    steps = clock.times[1:]  # the first put() is the prompt
    assert len(steps) == new_tokens, (len(steps), new_tokens)
    return total, [t - t0 for t in steps]


def bench_shape(
    model: Any,
    *,
    batch: int,
    input_len: int,
    output_len: int,
    vocab: int,
    runs: int,
    device: str,
    static_cache: bool,
    seed: int,
) -> dict[str, Any]:
    """Medians over `runs` generate() calls of `batch` random prompts (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, input_len), generator=gen).to(device)
    row: dict[str, Any] = {"batch": batch, "input_len": input_len, "output_len": output_len}
    totals, firsts, decodes, steps = [], [], [], []
    try:
        timed_generate(model, ids, new_tokens=2, device=device, static_cache=static_cache)  # warm-up
        for _ in range(runs):
            total, times = timed_generate(
                model, ids, new_tokens=output_len, device=device, static_cache=static_cache
            )
            totals.append(total)
            firsts.append(times[0])
            decodes.append(times[-1] - times[0])
            steps += [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    except torch.OutOfMemoryError as e:
        return {**row, "error": f"out of memory: {str(e)[:120]}"}
    decode = percentile(decodes, 50)
    row.update(
        {
            "prefill_ms": percentile(firsts, 50) * 1e3,
            "total_ms": percentile(totals, 50) * 1e3,
            "decode_tok_s": batch * (output_len - 1) / decode if output_len > 1 else float("nan"),
            "output_tok_s": batch * output_len / percentile(totals, 50),
            "tpot_ms": decode / (output_len - 1) * 1e3 if output_len > 1 else float("nan"),
            "step_ms": summarize(steps, scale=1e3),
        }
    )
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hf_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="llama-3.1-8b", help=".gguf, safetensors folder, or config (dummy weights)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batch-sizes", type=parse_int_list, default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--presets", type=lambda s: [x for x in s.split(",") if x], default=[], help="IN/OUT,...")
    p.add_argument("--preset-batches", type=parse_int_list, default=[1, 16, 64])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--static-cache", action="store_true", help="cache_implementation='static' (still eager)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default bench/results/hf-<card>-<date>.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype_name = (
        args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    )
    dtype = getattr(torch, dtype_name)
    model, vocab, source = build_model(args.model, device=device, dtype=dtype, seed=args.seed)
    common = {
        "vocab": vocab,
        "runs": args.runs,
        "device": device,
        "static_cache": args.static_cache,
        "seed": args.seed,
    }
    rows = []
    for b in args.batch_sizes:
        rows.append(
            bench_shape(model, batch=b, input_len=args.input_len, output_len=args.output_len, **common)
        )
        print(rows[-1], flush=True)
    presets = []
    for preset in args.presets:
        in_len, out_len = (int(x) for x in preset.split("/"))
        for b in args.preset_batches:
            presets.append(
                {
                    "preset": preset,
                    **bench_shape(
                        model, batch=b, input_len=in_len, output_len=out_len, **{**common, "runs": 1}
                    ),
                }
            )
            print(presets[-1], flush=True)
    payload = {
        "benchmark": "hf_baseline",
        "machine": machine_facts(),
        "params": {
            **vars(args),
            "device": device,
            "dtype": dtype_name,
            "attention": "sdpa",
            "mode": "eager" + (" + static cache" if args.static_cache else ""),
            "weights": source,
        },
        "batches": rows,
        "presets": presets,
    }
    path = write_results(payload, name="hf", out=args.out)
    table = [
        [
            r.get("preset", f"{r['input_len']}/{r['output_len']}"),
            r["batch"],
            r.get("prefill_ms", "-"),
            r.get("tpot_ms", "-"),
            r.get("decode_tok_s", r.get("error", "-")),
            r.get("output_tok_s", "-"),
        ]
        for r in rows + presets
    ]
    print(format_table(["in/out", "batch", "prefill ms", "TPOT ms", "decode tok/s", "output tok/s"], table))
    print(f"weights: {source}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
