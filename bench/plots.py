"""Plots and a compact summary from results JSON files.

    python -m bench.plots bench/results/serve-*.json --out-dir bench/results/plots
    python -m bench.plots --summary $OUT/*.json          # the table only (no matplotlib needed)

serve results: output tok/s vs concurrency (one line per preset), TTFT and ITL CDFs per level.
engine results: decode tok/s and step latency vs batch size. One PNG per input file. matplotlib
is optional: without it the plots are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import format_table


def _conc_x(c: Any, finite: list[int]) -> float:
    """x position of a concurrency level; "inf" sits one doubling past the largest finite level."""
    return float(c) if c != "inf" else float(max(finite or [1]) * 2)


def plot_serve(data: dict[str, Any], png: Path, plt: Any) -> None:
    levels = data["levels"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    finite = [lv["concurrency"] for lv in levels if lv["concurrency"] != "inf"]
    for preset in dict.fromkeys(lv["preset"] for lv in levels):
        ls = [lv for lv in levels if lv["preset"] == preset]
        axes[0].plot(
            [_conc_x(lv["concurrency"], finite) for lv in ls],
            [lv["output_throughput"] for lv in ls],
            marker="o",
            label=preset,
        )
        for lv in ls:
            for ax, key in ((axes[1], "ttft_ms"), (axes[2], "itl_ms")):
                xs = sorted(lv["samples"][key])
                if xs:
                    ax.plot(
                        xs,
                        [(i + 1) / len(xs) for i in range(len(xs))],
                        label=f"{preset} c={lv['concurrency']}",
                    )
    axes[0].set(xscale="log", xlabel="concurrency", ylabel="output tok/s", title="throughput vs concurrency")
    ticks = {_conc_x(lv["concurrency"], finite): str(lv["concurrency"]) for lv in levels}
    axes[0].set_xticks(list(ticks), list(ticks.values()))
    axes[0].minorticks_off()
    axes[1].set(xscale="log", xlabel="TTFT ms", ylabel="fraction of requests", title="TTFT CDF")
    axes[2].set(xscale="log", xlabel="ITL ms", ylabel="fraction of gaps", title="ITL CDF")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(_title(data))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_engine(data: dict[str, Any], png: Path, plt: Any) -> None:
    bs = data["batches"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    x = [b["batch"] for b in bs]
    axes[0].plot(x, [b["decode_tok_s"] for b in bs], marker="o")
    axes[0].set(
        xscale="log", yscale="log", xlabel="batch size", ylabel="decode tok/s", title="decode throughput"
    )
    for key, label in (("p50", "p50"), ("p99", "p99")):
        axes[1].plot(x, [b["decode_step_ms"][key] for b in bs], marker="o", label=f"step {label}")
    axes[1].plot(x, [b["decode_step_forward_ms"]["p50"] for b in bs], marker="x", label="shard forward p50")
    axes[1].set(xscale="log", xlabel="batch size", ylabel="ms", title="decode step latency")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle(_title(data))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _title(data: dict[str, Any]) -> str:
    m = data.get("machine", {})
    where = (m.get("gpus") or [m.get("cpu_model", "?")])[0]
    return f"{data['benchmark']} on {where} ({m.get('git_commit', '?')[:12]})"


# ------------------------------------------------------------------------------- summary table


def summary_rows(data: dict[str, Any]) -> list[list[Any]]:
    """[benchmark, case, metric, value] rows of the headline numbers of one results file."""
    kind = data.get("benchmark")
    rows: list[list[Any]] = []
    if kind == "bandwidth":
        rows.append(["bandwidth", "copy", "GB/s", data["bandwidth"]["copy"]["bytes_per_s"] / 1e9])
        for c in data["ceilings"]:
            rows.append(["bandwidth", f"ctx {c['context']}", "b1 ceiling tok/s", c["ceiling_tok_s_copy_bw"]])
    elif kind == "engine":
        for p in data["prefill"]:
            rows.append(["engine", f"prefill b1 x {p['input_len']}", "ms p50", p["prefill_ms"]["p50"]])
        for b in data["batches"]:
            rows.append(["engine", f"b{b['batch']} in{b['input_len']}", "decode tok/s", b["decode_tok_s"]])
            rows.append(
                [
                    "engine",
                    f"b{b['batch']} in{b['input_len']}",
                    "step p50/p99 ms",
                    f"{b['decode_step_ms']['p50']:.2f}/{b['decode_step_ms']['p99']:.2f}",
                ]
            )
    elif kind in ("serve", "sched"):  # sched: the same plan through the scheduler alone, no HTTP
        for lv in data["levels"]:
            case = f"{lv['preset']} c={lv['concurrency']}"
            rows.append([kind, case, "out tok/s", lv["output_throughput"]])
            rows.append(
                [kind, case, "TTFT/TPOT p50 ms", f"{lv['ttft_ms']['p50']:.1f}/{lv['tpot_ms']['p50']:.2f}"]
            )
    elif kind == "hf_baseline":
        for r in data["batches"] + data["presets"]:
            case = f"{r.get('preset', str(r['input_len']) + '/' + str(r['output_len']))} b{r['batch']}"
            rows.append(
                [
                    "hf",
                    case,
                    "decode tok/s" if "preset" not in r else "out tok/s",
                    r.get("decode_tok_s" if "preset" not in r else "output_tok_s", r.get("error", "-")),
                ]
            )
    elif kind == "cpu":
        for k, v in data["goals"].items():
            rows.append(["cpu", "goal", k, v])
    return rows


def http_over_sched(datas: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """HTTP output tok/s over the scheduler-only figure of the same preset and concurrency (a serve
    and a sched file of one run): what the HTTP server and the text work cost at that load."""

    def levels(kind: str) -> dict[tuple[str, Any], float]:
        return {
            (lv["preset"], lv["concurrency"]): lv["output_throughput"]
            for d in datas if d.get("benchmark") == kind for lv in d["levels"]
        }  # fmt: skip

    serve, sched = levels("serve"), levels("sched")
    return [
        ["http/sched", f"{preset} c={conc}", "HTTP / no-HTTP", f"{serve[(preset, conc)] / tok_s:.1%}"]
        for (preset, conc), tok_s in sched.items()
        if (preset, conc) in serve and tok_s > 0
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--out-dir", default=None, help="where PNGs go (default: beside each JSON)")
    p.add_argument("--summary", action="store_true", help="print the summary table only")
    args = p.parse_args(argv)
    datas = []
    for f in args.files:
        try:
            datas.append((Path(f), json.loads(Path(f).read_text())))
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {f}: {e}")
    rows = [r for _, d in datas for r in summary_rows(d)]
    rows += http_over_sched([d for _, d in datas])
    print(
        format_table(
            ["bench", "case", "metric", "value"],
            [[*r[:3], "nan" if isinstance(r[3], float) and math.isnan(r[3]) else r[3]] for r in rows],
        )
    )
    if args.summary:
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return 0
    for path, data in datas:
        plot = {"serve": plot_serve, "engine": plot_engine}.get(data.get("benchmark"))
        if plot is None:
            continue
        out = Path(args.out_dir) if args.out_dir else path.parent
        out.mkdir(parents=True, exist_ok=True)
        png = out / (path.stem + ".png")
        plot(data, png, plt)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
