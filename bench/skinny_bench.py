"""Decode's weight-streaming matmuls at Llama-3.1-8B shapes: cuBLAS against the Triton kernel of
shard/native/kernels/skinny.py, with a sweep of its launch configs.

    PYTHONPATH=. python3 bench/skinny_bench.py --out skinny.json [--quick]

For each projection of the 8B model (TP=1 and one TP=2 rank's shard) and rows M of x: torch's
F.linear (cuBLAS), every config of the sweep, and the best. Reports microseconds and the weight bytes
per second as a fraction of the measured copy bandwidth (read+write of a 1 GiB copy). Every timed
Triton output is checked against float32 x @ w.T first. Medians of triton.testing.do_bench, which
clears L2 before each repetition (in a real step every weight comes from HBM).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from shard.native.kernels.skinny import SkinnyConfig, pick_config, skinny_matmul

SHAPES = {  # name -> (N, K) of w
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
    "qkv/tp2": (3072, 4096),
    "o/tp2": (4096, 2048),
    "gate_up/tp2": (14336, 4096),
    "down/tp2": (4096, 7168),
    "lm_head/tp2": (64128, 4096),
}


def configs(m: int, quick: bool) -> list[SkinnyConfig]:
    out = []
    stages = (3, 4) if not quick else (4,)
    for bn, bk, w, st in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), stages):
        out.append(SkinnyConfig(block_n=bn, block_k=bk, num_warps=w, num_stages=st, use_dot=True))
    if m <= 4:
        bm = 1 if m == 1 else 2 if m == 2 else 4
        for bn, bk, w, st in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4), stages):
            if bm * bn * bk <= 16384:  # the float32 partial products live in registers
                out.append(SkinnyConfig(block_n=bn, block_k=bk, num_warps=w, num_stages=st, use_dot=False))
    return out


def ms(fn) -> float:
    return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="skinny.json")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dt = torch.bfloat16
    torch.manual_seed(0)
    src = torch.empty(1 << 29, device="cuda", dtype=dt)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 2 / (ms(lambda: dst.copy_(src)) * 1e-3)  # noqa: F821 (deleted below)
    del src, dst
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    print(info, f"copy bandwidth {copy_bw / 1e12:.3f} TB/s", flush=True)
    results = {"info": info, "copy_bw_Bps": copy_bw, "cases": []}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
        wbytes = w.numel() * w.element_size()
        for m in (int(x) for x in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            ref = x.float() @ w.float().T
            t_lin = ms(lambda x=x, w=w: F.linear(x, w))
            t_default = None
            sweep = []
            for cfg in configs(m, args.quick) + [pick_config(m, n, k)]:
                try:
                    out = skinny_matmul(x, w, config=cfg)
                except Exception as e:  # out of shared memory / registers: not a candidate
                    sweep.append({"config": cfg.__dict__, "error": str(e)[:120]})
                    continue
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    sweep.append({"config": cfg.__dict__, "error": f"rel err {err:.2e}"})
                    continue
                t = ms(lambda cfg=cfg, x=x, w=w: skinny_matmul(x, w, config=cfg))
                sweep.append({"config": cfg.__dict__, "us": t * 1e3, "rel_err": err})
                if cfg is not None and cfg == pick_config(m, n, k):
                    t_default = t
            ok = [s for s in sweep if "us" in s]
            best = min(ok, key=lambda s: s["us"])
            case = {
                "shape": name,
                "n": n,
                "k": k,
                "m": m,
                "weight_bytes": wbytes,
                "cublas_us": t_lin * 1e3,
                "cublas_bw_frac": wbytes / (t_lin * 1e-3) / copy_bw,
                "default_us": None if t_default is None else t_default * 1e3,
                "best_us": best["us"],
                "best_bw_frac": wbytes / (best["us"] * 1e-6) / copy_bw,
                "best_config": best["config"],
                "sweep": sweep,
            }
            results["cases"].append(case)
            print(
                f"{name:12s} M={m:2d} cuBLAS {t_lin * 1e3:7.1f} us ({case['cublas_bw_frac']:.0%})  "
                f"default {case['default_us'] or 0:7.1f} us  best {best['us']:7.1f} us "
                f"({case['best_bw_frac']:.0%}) {best['config']}",
                flush=True,
            )
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
