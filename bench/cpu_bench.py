"""Issue 2's CPU benchmark of the embedded model (SmolLM2-135M-Instruct GGUF, float32), one run:

  (a) Hugging Face transformers generate: batch-1 decode tok/s and a 16-sequence static batch;
  (b) our stack (launcher -> shards -> router, default model): batch-1 decode tok/s from the
      streamed TPOT, and the aggregate output tok/s of 16 concurrent requests;
  (c) the CPU ceiling: measured memory bandwidth / bytes read per decode step (bench/bandwidth.py).

    python -m bench.cpu_bench            # writes bench/results/cpu-cpu-<date>.json, prints a table

Goals, reported and not asserted: ours batch-1 >= HF batch-1; ours 16-concurrent aggregate >= 5x
ours batch-1. The 1-minute load average is recorded: other work on a 2-core machine skews it all.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
from collections.abc import Sequence
from typing import Any

from bench.common import exit_on_sigterm, format_table, machine_facts, results_path, write_results


def hf_part(gguf: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.hf_baseline import bench_shape, build_model

    model, vocab, source = build_model(gguf, device="cpu", dtype=torch.float32, seed=0)
    common = {
        "input_len": args.input_len,
        "output_len": args.output_len,
        "vocab": vocab,
        "runs": args.runs,
        "device": "cpu",
        "static_cache": False,
        "seed": 0,
    }
    out = {
        "weights": source,
        "batch1": bench_shape(model, batch=1, **common),
        f"batch{args.concurrency}": bench_shape(model, batch=args.concurrency, **common),
    }
    del model
    gc.collect()
    return out


def ours_part(gguf: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench.serve_bench import exact_prompt, level_result, plain_vocab, run_level
    from router.tokenizer import load_tokenizer
    from tests.stack import running_stack

    tok = load_tokenizer(gguf)
    rng = random.Random(0)
    vocab = plain_vocab(tok)
    extra = {"ignore_eos_token": True}

    def prompts(n: int) -> list[tuple[str, int]]:
        return [exact_prompt(tok, args.input_len, rng, vocab=vocab) for _ in range(n)]

    stack_args = [
        "--max-input-tokens",
        str(max(1024, args.input_len)),
        "--max-total-tokens",
        str(max(2048, args.input_len + args.output_len)),
        *args.stack_args.split(),
    ]
    # torch reads OMP_NUM_THREADS at start-up in the shard processes.
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    with running_stack(stack_args, timeout=600, env=env) as stack:
        url = stack.base_url
        asyncio.run(
            run_level(url, prompts(2), max_new_tokens=16, concurrency=None, extra_params=extra)
        )  # warm-up
        one = level_result(
            *asyncio.run(
                run_level(
                    url, prompts(args.runs), max_new_tokens=args.output_len, concurrency=1, extra_params=extra
                )
            ),
            preset=f"{args.input_len}/{args.output_len}",
            concurrency=1,
            max_new_tokens=args.output_len,
        )
        many = level_result(
            *asyncio.run(
                run_level(
                    url,
                    prompts(args.concurrency),
                    max_new_tokens=args.output_len,
                    concurrency=args.concurrency,
                    extra_params=extra,
                )
            ),
            preset=f"{args.input_len}/{args.output_len}",
            concurrency=args.concurrency,
            max_new_tokens=args.output_len,
        )
    for r in (one, many):
        r.pop("samples")
    return {
        "batch1": {**one, "decode_tok_s": 1e3 / one["tpot_ms"]["p50"]},
        f"concurrent{args.concurrency}": many,
    }


def ceiling_part(gguf: str) -> dict[str, Any]:
    from bench.bandwidth import ceilings, load_hf_config, measure

    bw = measure(device="cpu", nbytes=2**29, repeats=10)
    return {
        "bandwidth": bw,
        "ceilings": ceilings(bw, load_hf_config(gguf), dtype="float32", contexts=[0, 256]),
    }


def report(res: dict[str, Any], conc: int) -> tuple[str, dict[str, Any]]:
    hf1 = res["hf"]["batch1"].get("decode_tok_s", float("nan"))
    hfn = res["hf"][f"batch{conc}"].get("output_tok_s", float("nan"))
    ours1 = res["ours"]["batch1"]["decode_tok_s"]
    oursn = res["ours"][f"concurrent{conc}"]["output_throughput"]
    ceil = res["ceiling"]["ceilings"][0]
    goals = {
        "ours_b1_ge_hf_b1": ours1 >= hf1,
        "ours_b1_over_hf_b1": ours1 / hf1,
        f"ours_c{conc}_ge_5x_ours_b1": oursn >= 5 * ours1,
        f"ours_c{conc}_over_ours_b1": oursn / ours1,
    }
    rows = [
        ["HF generate", "batch 1 decode", hf1],
        ["HF generate", f"static batch {conc}, output", hfn],
        [
            "HF generate",
            f"static batch {conc}, decode",
            res["hf"][f"batch{conc}"].get("decode_tok_s", float("nan")),
        ],
        ["ours (HTTP)", "batch 1 decode (1/TPOT p50)", ours1],
        ["ours (HTTP)", f"{conc} concurrent, output", oursn],
        ["ceiling", "copy bandwidth / bytes per token", ceil["ceiling_tok_s_copy_bw"]],
        ["ceiling", "read bandwidth / bytes per token", ceil.get("ceiling_tok_s_read_bw", float("nan"))],
    ]
    text = format_table(["what", "measure", "tok/s"], rows)
    text += (
        f"\ngoal ours batch-1 >= HF batch-1: {'met' if goals['ours_b1_ge_hf_b1'] else 'NOT met'} "
        f"({goals['ours_b1_over_hf_b1']:.2f}x)"
        f"\ngoal ours {conc}-concurrent >= 5x ours batch-1: "
        f"{'met' if goals[f'ours_c{conc}_ge_5x_ours_b1'] else 'NOT met'} ({goals[f'ours_c{conc}_over_ours_b1']:.2f}x)"
    )
    return text, goals


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--runs", type=int, default=3, help="batch-1 requests / HF repeats")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for HF and the shards (0 = torch's default, one per core); on a busy machine 1 "
        "avoids OpenMP threads waiting for each other",
    )
    p.add_argument("--stack-args", default="", help="extra launcher flags for our stack")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/cpu-cpu-<date>.json)")
    args = p.parse_args(argv)
    exit_on_sigterm()
    from launcher.embedded import embedded_model_path

    gguf = embedded_model_path()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    facts = machine_facts()
    out = args.out or str(results_path("cpu", facts))
    payload: dict[str, Any] = {
        "benchmark": "cpu",
        "machine": facts,
        "params": {**vars(args), "model": gguf, "dtype": "float32"},
    }
    # Each part is saved as soon as it is done: a run cut short keeps what it measured.
    print("(c) ceiling: measuring memory bandwidth", flush=True)
    payload["ceiling"] = ceiling_part(gguf)
    write_results(payload, name="cpu", out=out)
    print("(a) Hugging Face generate, batch 1 and static batch", args.concurrency, flush=True)
    payload["hf"] = hf_part(gguf, args)
    write_results(payload, name="cpu", out=out)
    print("(b) our stack over HTTP, batch 1 and", args.concurrency, "concurrent", flush=True)
    payload["ours"] = ours_part(gguf, args)
    text, payload["goals"] = report(payload, args.concurrency)
    payload["loadavg_1m_after"] = machine_facts()["loadavg_1m"]
    path = write_results(payload, name="cpu", out=out)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
