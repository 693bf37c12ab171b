"""HTTP serving against the engine alone at the same load (the issue's "overhead" yardstick).

    python -m bench.equal_load ENGINE.json HTTP.json

ENGINE.json: bench.engine_bench with --decode-steps OUT-1 (its `wave_tok_s`: B prompts prefilled
in the router's chunks, then decoded to OUT tokens each, over gRPC). HTTP.json: bench.serve_bench
with B prompts of the same lengths sent at once (concurrency "inf", or 1 for B = 1). Rows pair a
batch of B with the HTTP level of B requests and print HTTP output tok/s over the engine's.
Both sides count the same work: B x OUT tokens from B prompts of IN tokens.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def pair(engine: dict[str, Any], http: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    by_batch = {b["batch"]: b for b in engine["batches"] if "wave_tok_s" in b}
    for level in http["levels"]:
        in_len, out_len = (int(x) for x in level["preset"].split("/"))
        # concurrency 1 serves one request at a time: batch 1; "all at once": batch = requests;
        # any other level is not one wave
        if level["concurrency"] not in (1, "inf"):
            continue
        if level["failed"]:  # e.g. 429s past --max-concurrent-requests: not the same work
            print(f"skipped {level['preset']} x{level['requests']}: {level['failed']} failed", file=sys.stderr)
            continue
        batch = 1 if level["concurrency"] == 1 else level["requests"]
        e = by_batch.get(batch)
        if e is None or e["input_len"] != in_len or e["decode_steps"] + 1 != out_len:
            continue
        rows.append(
            {
                "preset": level["preset"],
                "batch": batch,
                "engine_tok_s": e["wave_tok_s"],
                "http_tok_s": level["output_throughput"],
                "http_over_engine": level["output_throughput"] / e["wave_tok_s"],
                "exact_output_fraction": level["exact_output_fraction"],
            }
        )
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        engine = json.load(f)
    with open(argv[1]) as f:
        http = json.load(f)
    rows = pair(engine, http)
    print(f"{'preset':>9} {'batch':>6} {'engine tok/s':>13} {'HTTP tok/s':>11} {'HTTP/engine':>12} {'exact out':>10}")
    for r in rows:
        print(
            f"{r['preset']:>9} {r['batch']:>6} {r['engine_tok_s']:13.1f} {r['http_tok_s']:11.1f} "
            f"{r['http_over_engine']:11.1%} {r['exact_output_fraction']:10.2f}"
        )
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
