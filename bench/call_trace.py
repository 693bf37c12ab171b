"""Where the time between two engine calls goes, from TGI_CALL_TRACE files (router/calltrace.py,
shard/calltrace.py): run a benchmark with TGI_CALL_TRACE=PREFIX set for the router and the shards,
then

    python -m bench.call_trace PREFIX

Each shard call's events pair up in order: router "send" -> shard "in", "engine_start",
"engine_end", "built", "out" -> router "recv", "parsed", "delivered" (the router's "call" marks
when the scheduler started it). For each pair of consecutive Decode calls it splits the host time
from the first call's engine end to the next one's engine start -- what the carried step has to
cover -- into its stages, and prints the mean, p50 and max of each (ms), by transition
(decode -> decode, decode -> prefill, ...). With serve_bench's client trace it also prints, per
level, how long the requests took to reach the router's scheduler.
"""

from __future__ import annotations

import glob
import json
import sys
from collections import defaultdict

SHARD = ("in", "engine_start", "engine_end", "built", "out")
ROUTER = ("send", "recv", "parsed", "delivered")


def load(path: str) -> list[tuple[str, str, float]]:
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f if line.strip()]  # type: ignore[misc]


def calls(prefix: str) -> list[dict[str, float]]:
    """One dict per shard call: event -> time; router "call" marks attach to the next send."""
    router = sorted(glob.glob(f"{prefix}.router.*.jsonl"))
    shards = sorted(glob.glob(f"{prefix}.shard.*.jsonl"))
    if not router or not shards:
        raise SystemExit(f"no trace files at {prefix}.router.*.jsonl / {prefix}.shard.*.jsonl")
    # rank 0 writes first at start-up: take the shard file whose first event is earliest
    shard_ev = min((load(p) for p in shards), key=lambda ev: ev[0][2] if ev else float("inf"))
    out: list[dict[str, float]] = []
    for ev, method, t in shard_ev:
        if ev == "in":
            out.append({"method": method})  # type: ignore[dict-item]
        if out:
            out[-1][ev] = t
    i, created = -1, None
    for ev, _method, t in load(router[0]):
        if ev in ("submit", "http"):
            continue
        if ev == "call":
            created = t
        elif ev == "send":
            i += 1
            if i < len(out):
                out[i]["send"] = t
                if created is not None:
                    out[i]["call"] = created
                    created = None
        elif 0 <= i < len(out):
            out[i][ev] = t
    return [c for c in out if all(k in c for k in (*SHARD, *ROUTER))]


def turnarounds(cs: list[dict[str, float]]) -> dict[str, list[dict[str, float]]]:
    stages = [
        ("shard: answer built", "engine_end", "built"),
        ("shard: answer to its loop", "built", "out"),
        ("gRPC: shard -> router", "out", "recv"),
        ("router: tokens parsed", "recv", "parsed"),
        ("router: tokens booked", "parsed", "delivered"),
    ]
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for a, b in zip(cs, cs[1:], strict=False):
        if b["engine_start"] - a["engine_end"] > 0.5:  # between benchmark levels: no work
            continue
        row = {name: (a[y] - a[x]) * 1e3 for name, x, y in stages}
        row["router: next call planned"] = (b.get("call", b["send"]) - a["delivered"]) * 1e3
        row["router: call to send"] = (b["send"] - b.get("call", b["send"])) * 1e3
        row["gRPC: router -> shard"] = (b["in"] - b["send"]) * 1e3
        row["shard: to the engine"] = (b["engine_start"] - b["in"]) * 1e3
        row["total"] = (b["engine_start"] - a["engine_end"]) * 1e3
        row["engine"] = (a["engine_end"] - a["engine_start"]) * 1e3
        groups[f"{a['method']} -> {b['method']}"].append(row)
    return groups


def arrivals(prefix: str) -> list[str]:
    """With a client trace (bench/serve_bench.py writes each level's start): how long after the
    client started sending the router admitted its first and last request (Scheduler.submit),
    and sent its first shard call."""
    clients, router = glob.glob(f"{prefix}.client.*.jsonl"), sorted(glob.glob(f"{prefix}.router.*.jsonl"))
    if not clients or not router:
        return []
    starts = sorted((t, int(n)) for p in clients for ev, n, t in load(p) if ev == "level_start")
    rev = load(router[0])
    out = []
    for i, (t0, n) in enumerate(starts):
        t_next = starts[i + 1][0] if i + 1 < len(starts) else float("inf")
        subs = [t for ev, _, t in rev if ev == "submit" and t0 <= t < t_next][:n]
        https = [t for ev, _, t in rev if ev == "http" and t0 <= t < t_next][:n]
        sends = [t for ev, _, t in rev if ev == "send" and t0 <= t < t_next]
        if subs and sends:
            reached = (
                f"first reached the app after {1e3 * (https[0] - t0):.0f} ms, the {len(https)}th after "
                f"{1e3 * (https[-1] - t0):.0f} ms; " if https else ""
            )
            out.append(
                f"level of {n} requests: {reached}first admitted after {1e3 * (subs[0] - t0):.0f} ms, "
                f"the {len(subs)}th after {1e3 * (subs[-1] - t0):.0f} ms; first shard call after "
                f"{1e3 * (sends[0] - t0):.0f} ms"
            )
    return out


def main() -> None:
    for line in arrivals(sys.argv[1]):
        print(line)
    cs = calls(sys.argv[1])
    for name, rows in turnarounds(cs).items():
        print(f"{name}: {len(rows)} turnarounds, ms per stage")
        for key in rows[0]:
            vals = sorted(r[key] for r in rows)
            print(f"  {key:28s} mean {sum(vals) / len(vals):7.2f}  p50 {vals[len(vals) // 2]:7.2f}  max {vals[-1]:7.2f}")


if __name__ == "__main__":
    main()
