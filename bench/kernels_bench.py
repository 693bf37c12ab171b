"""Times the Triton fast-path kernels against torch alternatives on one CUDA GPU.

    PYTHONPATH=. python3 bench/kernels_bench.py --out results.json [--quick]
    PYTHONPATH=. python3 bench/kernels_bench.py --aot     # CPU machine with triton: compile check
    TRITON_INTERPRET=1 PYTHONPATH=. python3 bench/kernels_bench.py --smoke   # CPU: script check

Measures first the card's two ceilings (device-to-device copy bandwidth, counting bytes read plus
written; a large bf16 matmul), then: paged decode attention at Llama-3.1-8B shapes (32 q heads,
8 kv heads, head_dim 128, bf16, block size 16, shuffled blocks) with its achieved bandwidth on
the K/V bytes it must read as a fraction of the copy bandwidth; a decode config sweep; store_kv
vs index_copy_; paged varlen prefill vs, without a cached prefix, dense SDPA (cuDNN or flash, as
torch picks), the backend's SDPA route and the FA2 varlen kernel, in TFLOP/s; fused RMSNorm /
rotary vs eager torch. Every timed kernel's output is checked against a torch result first.
Medians of triton.testing.do_bench (which clears L2 before each repetition). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from shard.native.kernels import triton_attention as ta
from shard.native.kernels.norm import add_rms_norm
from shard.native.kernels.rotary import apply_rotary_

HQ, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
DEV = "cuda"
SMOKE = False  # --smoke: tiny shapes on the CPU through TRITON_INTERPRET=1, wall-clock "timings"
ROWS: list[str] = []


def bench(fn: Callable[[], object], *, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def row(text: str) -> None:
    ROWS.append(text)
    print(text, flush=True)


def ceilings() -> dict:
    n = 1 << (16 if SMOKE else 29)  # 1 GiB of bf16 each way
    src = torch.randn(n, device=DEV, dtype=DT)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 2 / (ms * 1e-3)
    src = dst = None  # free before the matmul
    m = 256 if SMOKE else 8192
    a = torch.randn(m, m, device=DEV, dtype=DT)
    b = torch.randn(m, m, device=DEV, dtype=DT)
    ms_mm = bench(lambda: a @ b)
    tflops = 2 * m**3 / (ms_mm * 1e-3) / 1e12
    row(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s (read+write) | bf16 matmul 8192^3 {tflops:.0f} TFLOP/s")
    return {"copy_bw_Bps": copy_bw, "matmul_tflops": tflops}


def paged_cache(lens: list[int], *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Caches holding exactly the blocks these sequences need, blocks shuffled."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    hkv = HKV
    nb = [math.ceil(n / BS) for n in lens]
    num_blocks = sum(nb)
    k_cache = torch.randn((num_blocks, BS, hkv, D), device=DEV, dtype=DT, generator=g)
    v_cache = torch.randn((num_blocks, BS, hkv, D), device=DEV, dtype=DT, generator=g)
    perm = torch.randperm(num_blocks, device=DEV, generator=g).to(torch.int32)
    tables = torch.zeros((len(lens), max(nb)), dtype=torch.int32, device=DEV)
    off = 0
    for i, c in enumerate(nb):
        tables[i, :c] = perm[off : off + c]
        off += c
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return k_cache, v_cache, tables, seq_lens


def gathered(k_cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """(B, HKV, L, D) contiguous K (or V) of equal-length sequences (torch baselines)."""
    b = tables.shape[0]
    return k_cache[tables.long()].reshape(b, -1, HKV, D)[:, :length].transpose(1, 2).contiguous()


class DecodeCase:
    """Equal-length sequences in a shuffled paged cache, their q, and a checked output."""

    def __init__(self, b: int, length: int) -> None:
        self.b, self.length = b, length
        self.k_cache, self.v_cache, self.tables, self.seq_lens = paged_cache([length] * b)
        self.q = torch.randn((b, HQ, D), device=DEV, dtype=DT)
        self.scale = D**-0.5
        kd, vd = gathered(self.k_cache, self.tables, length), gathered(self.v_cache, self.tables, length)
        ref = F.scaled_dot_product_attention(
            self.q[:, :, None].float(), kd.float(), vd.float(), scale=self.scale, enable_gqa=True
        )
        self.ref = ref[:, :, 0].to(DT)
        self.kv_bytes = 2 * b * length * HKV * D * 2

    def run(self, cfg: ta.DecodeConfig) -> torch.Tensor:
        return ta.paged_decode_attention(
            self.q, self.k_cache, self.v_cache, self.tables, self.seq_lens, self.scale, config=cfg
        )

    def time(self, cfg: ta.DecodeConfig, copy_bw: float, *, graph: bool = False) -> dict:
        err = rel(self.run(cfg), self.ref)
        ms = bench(lambda: self.run(cfg))
        splits = ta.choose_num_splits(
            batch=self.b, num_kv_heads=HKV, max_context=self.tables.shape[1] * BS,
            num_sms=num_sms(), config=cfg,
        )  # fmt: skip
        res = {"B": self.b, "L": self.length, "ms": ms, "GBps": self.kv_bytes / ms / 1e6,
               "frac_copy": self.kv_bytes / (ms * 1e-3) / copy_bw, "rel_err": err, "splits": splits,
               "floor_ms": self.kv_bytes / copy_bw * 1e3, "config": cfg.__dict__}  # fmt: skip
        if graph and not SMOKE:  # the launch cost as a captured decode step sees it (Python wrapper excluded)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.run(cfg)
            res["graph_ms"] = bench(g.replay)
        return res

    def torch_baselines(self) -> dict:
        b, length, scale = self.b, self.length, self.scale
        qd = self.q[:, :, None]
        kd, vd = gathered(self.k_cache, self.tables, length), gathered(self.v_cache, self.tables, length)
        dense = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True))

        def gather_sdpa() -> torch.Tensor:  # what the reference backend does per step
            kk = self.k_cache[self.tables.long()].reshape(b, -1, HKV, D)[:, :length].transpose(1, 2)
            vv = self.v_cache[self.tables.long()].reshape(b, -1, HKV, D)[:, :length].transpose(1, 2)
            return F.scaled_dot_product_attention(qd, kk, vv, scale=scale, enable_gqa=True)

        return {"sdpa_dense_ms": dense, "gather_sdpa_ms": bench(gather_sdpa)}


DECODE_SHAPES = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 32768), (8, 4096), (32, 2048),
                 (64, 1024), (64, 4096), (128, 2048), (256, 1024), (256, 4096)]  # fmt: skip


def decode_section(copy_bw: float, quick: bool) -> list[dict]:
    results = []
    row("\n== paged decode, Llama-3.1-8B shapes (32q/8kv heads, D128, bf16, block 16) ==")
    row(f"{'B':>4} {'L':>6} {'split':>5} {'ms':>8} {'graph':>8} {'floor':>8} {'GB/s':>6} {'%copy':>6} "
        f"{'dense sdpa':>10} {'gath+sdpa':>9} {'err':>7}")  # fmt: skip
    for b, length in DECODE_SHAPES[:6] if quick else DECODE_SHAPES:
        case = DecodeCase(b, length)
        r = case.time(ta.DecodeConfig(), copy_bw, graph=True) | case.torch_baselines()
        del case
        results.append(r)
        row(f"{b:>4} {length:>6} {r['splits']:>5} {r['ms']:>8.4f} {r.get('graph_ms', float('nan')):>8.4f} {r['floor_ms']:>8.4f} "
            f"{r['GBps']:>6.0f} {100 * r['frac_copy']:>5.1f}% {r['sdpa_dense_ms']:>10.4f} {r['gather_sdpa_ms']:>9.4f} "
            f"{r['rel_err']:>7.1e}")  # fmt: skip
    return results


def decode_sweep(copy_bw: float, quick: bool) -> list[dict]:
    row("\n== decode config sweep (% of copy bandwidth) ==")
    shapes = SWEEP_SHAPES
    base = ta.DecodeConfig()
    configs = [
        replace(base, block_n=bn, num_warps=w, num_stages=st)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for st in (2, 3)
    ]
    configs += [replace(base, programs_per_sm=p) for p in (1.0, 2.0, 8.0)]
    configs = configs[:3] if quick else configs
    table: dict[int, list[str]] = {i: [] for i in range(len(configs))}
    out = []
    for b, length in shapes:
        case = DecodeCase(b, length)
        for i, cfg in enumerate(configs):
            try:
                r = case.time(cfg, copy_bw)
                cell = f"{100 * r['frac_copy']:5.1f}%" + ("" if r["rel_err"] < 1e-2 else "!ERR")
            except Exception as e:  # a config that fails to compile (shared memory) is a data point
                r = {"B": b, "L": length, "error": repr(e)[:200], "config": cfg.__dict__}
                cell = "  err "
            out.append(r)
            table[i].append(f"{b}x{length}:{cell}")
        del case
    for i, cfg in enumerate(configs):
        row(
            f"bn={cfg.block_n:<3} w={cfg.num_warps} st={cfg.num_stages} ppsm={cfg.programs_per_sm:<4} | "
            + " ".join(table[i])
        )
    return out


def store_section(copy_bw: float) -> list[dict]:
    row("\n== store_kv (K and V of T tokens into the paged cache) ==")
    out = []
    num_blocks = 64 if SMOKE else 8192
    k_cache = torch.randn((num_blocks, BS, HKV, D), device=DEV, dtype=DT)
    v_cache = torch.randn_like(k_cache)
    for t in STORE_TOKENS:
        qkv = torch.randn((t, (HQ + 2 * HKV) * D), device=DEV, dtype=DT)
        k = qkv[:, HQ * D : (HQ + HKV) * D].view(t, HKV, D)
        v = qkv[:, (HQ + HKV) * D :].view(t, HKV, D)
        slots = torch.randperm(num_blocks * BS, device=DEV)[:t]
        ta.store_kv(k, v, k_cache, v_cache, slots)
        ok = torch.equal(k_cache.view(-1, HKV, D)[slots], k) and torch.equal(
            v_cache.view(-1, HKV, D)[slots], v
        )
        ms_t = bench(lambda: ta.store_kv(k, v, k_cache, v_cache, slots))  # noqa: B023

        def idx_copy() -> None:
            k_cache.view(-1, HKV, D).index_copy_(0, slots, k)  # noqa: B023
            v_cache.view(-1, HKV, D).index_copy_(0, slots, v)  # noqa: B023

        ms_i = bench(idx_copy)
        nbytes = 2 * 2 * t * HKV * D * 2
        out.append({"T": t, "triton_ms": ms_t, "index_copy_ms": ms_i, "correct": ok, "bytes": nbytes})
        row(f"T={t:>5}: triton {ms_t * 1e3:8.1f} us | index_copy_ x2 {ms_i * 1e3:8.1f} us | "
            f"triton {nbytes / (ms_t * 1e-3) / copy_bw * 100:5.1f}% of copy bw | correct={ok}")  # fmt: skip
    return out


def prefill_flops(lens: list[int], news: list[int]) -> float:
    total = 0
    for length, new in zip(lens, news, strict=True):
        pre = length - new
        total += new * pre + new * (new + 1) // 2  # visible keys over all new rows
    return 4.0 * HQ * D * total


def prefill_case(lens: list[int], news: list[int], cfg: ta.PrefillConfig, *, sdpa: bool) -> dict:
    k_cache, v_cache, tables, seq_lens = paged_cache(lens)
    t = sum(news)
    q = torch.randn((t, HQ, D), device=DEV, dtype=DT)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=DEV)
    cu[1:] = torch.cumsum(torch.tensor(news, device=DEV), 0)
    scale = D**-0.5

    def run() -> torch.Tensor:
        return ta.paged_prefill_attention(
            q, k_cache, v_cache, tables, seq_lens, cu, max(news), scale, config=cfg
        )

    out = run()
    # check the first and last sequence against torch (fp32, explicit bottom-right causal mask)
    errs = []
    for i in {0, len(lens) - 1}:
        length, new = lens[i], news[i]
        kk = gathered(k_cache, tables[i : i + 1], length).float()
        vv = gathered(v_cache, tables[i : i + 1], length).float()
        qq = q[cu[i] : cu[i + 1]].float().transpose(0, 1)[None]
        mask = (
            torch.arange(length, device=DEV)[None] <= torch.arange(length - new, length, device=DEV)[:, None]
        )
        ref = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
        errs.append(rel(out[cu[i] : cu[i + 1]], ref[0].transpose(0, 1)))
    ms = bench(run)
    flops = prefill_flops(lens, news)
    res = {
        "lens": lens,
        "news": news,
        "ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "rel_err": max(errs),
        "config": cfg.__dict__,
    }
    if sdpa and all(n == lens[0] for n in news) and lens == news:
        b, length = len(lens), lens[0]
        qd = torch.randn((b, HQ, length, D), device=DEV, dtype=DT)
        kd, vd = gathered(k_cache, tables, length), gathered(v_cache, tables, length)
        res["sdpa_flash_ms"] = bench(
            lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
        )
        res["sdpa_tflops"] = flops / (res["sdpa_flash_ms"] * 1e-3) / 1e12
        # the backend's route for fresh sequences of equal length: SDPA on views of flat (T, H, D)
        k_new, v_new = (x.transpose(1, 2).reshape(t, HKV, D) for x in (kd, vd))  # sequence-major
        dense = ta.dense_causal_prefill(q, k_new, v_new, scale, num_seqs=b)
        res["dense_route_err"] = rel(dense, out)
        res["dense_route_ms"] = bench(lambda: ta.dense_causal_prefill(q, k_new, v_new, scale, num_seqs=b))
    if sdpa and lens == news and DEV == "cuda":  # FA2 needs CUDA (and fp16/bf16): not in --smoke
        res |= varlen_route(q, k_cache, v_cache, tables, lens, cu, scale, out, flops)
    return res


def varlen_route(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: list[int],
    cu: torch.Tensor, scale: float, paged_out: torch.Tensor, flops: float,
) -> dict:  # fmt: skip
    """The backend's route for sequences without a cached prefix (any lengths): FA2 varlen on the
    new K/V, here the cache's contents laid out flat (T, HKV, D), checked against the paged kernel."""

    def flat(cache: torch.Tensor) -> torch.Tensor:  # (sum(lens), HKV, D)
        seqs = [gathered(cache, tables[i : i + 1], n)[0].transpose(0, 1) for i, n in enumerate(lens)]
        return torch.cat(seqs)

    k_new, v_new = flat(k_cache), flat(v_cache)

    def run() -> torch.Tensor:
        return ta.varlen_causal_prefill(q, k_new, v_new, cu, max(lens), scale)

    err = rel(run(), paged_out)
    ms = bench(run)
    return {"varlen_route_ms": ms, "varlen_tflops": flops / (ms * 1e-3) / 1e12, "varlen_route_err": err}


SWEEP_SHAPES = [(1, 2048), (1, 8192), (64, 1024), (64, 4096), (256, 2048)]
STORE_TOKENS = (1, 64, 256, 8192)
PREFILL_SWEEP_CASES = (([4096], [4096]), ([512] * 8, [512] * 8), ([4096], [512]))
HIDDEN, MAX_POS, FUSED_TOKENS = 4096, 8192, (1, 64, 4096)
PREFILL_CASES = [([512], [512]), ([2048], [2048]), ([4096], [4096]), ([8192], [8192]), ([512] * 8, [512] * 8),
                 ([2048] * 4, [2048] * 4), ([1, 17, 300, 2048], [1, 17, 300, 2048]),
                 ([4096], [512]), ([4096] * 4, [2048] * 4)]  # fmt: skip


def _lens_text(xs: list[int]) -> str:
    return str(xs[0]) if len(set(xs)) == 1 else "/".join(map(str, xs))


def prefill_section(quick: bool) -> dict:
    row("\n== paged varlen prefill (32q/8kv, D128, bf16); causal TFLOP/s ==")
    default = []
    for lens, news in PREFILL_CASES[:3] if quick else PREFILL_CASES:
        r = prefill_case(lens, news, ta.PrefillConfig(), sdpa=True)
        default.append(r)
        sd = f"{r['sdpa_flash_ms']:.3f} ms ({r['sdpa_tflops']:.0f} TF/s)" if "sdpa_flash_ms" in r else "-"
        if "dense_route_ms" in r:
            sd += f" | backend route {r['dense_route_ms']:.3f} ms (vs triton err {r['dense_route_err']:.1e})"
        if "varlen_route_ms" in r:
            sd += (f" | varlen flash {r['varlen_route_ms']:.3f} ms ({r['varlen_tflops']:.0f} TF/s, "
                   f"vs triton err {r['varlen_route_err']:.1e})")  # fmt: skip
        row(f"B={len(lens)} L={_lens_text(lens)} new={_lens_text(news)}: triton {r['ms']:.3f} ms ({r['tflops']:.0f} TF/s) | "
            f"dense sdpa causal {sd} | err {r['rel_err']:.1e}")  # fmt: skip
    return default


# (sequences, length) shapes fresh equal-length prefills meet: benchmark lengths and odd ones
FIRST_CALL_SHAPES = [(1, 1024), (1, 1000), (1, 1537), (1, 2048), (4, 2048), (8, 2048), (7, 2048),
                     (64, 128), (59, 128), (5, 128), (16, 1024), (8, 1000)]  # fmt: skip


def first_call_section() -> list[dict]:
    """What a shape's first call costs on each prefill route (wall clock, synchronized, ms),
    against its steady-state time: cuDNN (SDPA's pick for the dense route on H100) plans a graph
    per new (B, L); the paged Triton kernel and FA2 varlen are compiled once. Per attention call
    (one layer); a model call runs it once per layer, but the plan is built once per process."""
    row("\n== first call per new (B, L) shape: dense SDPA (cuDNN) vs paged triton vs FA2 varlen, ms ==")
    out = [first_call_case(b, length) for b, length in FIRST_CALL_SHAPES]
    return out


def _wall_ms(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _with_backend(backend: SDPBackend, fn: Callable[..., torch.Tensor], *args: object, **kw: object) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return fn(*args, **kw)


def first_call_case(b: int, length: int) -> dict:
    lens = [length] * b
    k_cache, v_cache, tables, seq_lens = paged_cache(lens)
    t = b * length
    q = torch.randn((t, HQ, D), device=DEV, dtype=DT)
    k_new, v_new = (gathered(c, tables, length).transpose(1, 2).reshape(t, HKV, D) for c in (k_cache, v_cache))
    cu = torch.arange(0, t + 1, length, dtype=torch.int32, device=DEV)
    scale = D**-0.5
    fns = {
        "dense": lambda: ta.dense_causal_prefill(q, k_new, v_new, scale, num_seqs=b),
        "paged": lambda: ta.paged_prefill_attention(q, k_cache, v_cache, tables, seq_lens, cu, length, scale),
        "varlen": lambda: ta.varlen_causal_prefill(q, k_new, v_new, cu, length, scale),
        "sdpa_flash": lambda: _with_backend(SDPBackend.FLASH_ATTENTION, ta.dense_causal_prefill, q, k_new, v_new, scale, num_seqs=b),
        "sdpa_cudnn": lambda: _with_backend(SDPBackend.CUDNN_ATTENTION, ta.dense_causal_prefill, q, k_new, v_new, scale, num_seqs=b),
    }  # fmt: skip
    r: dict = {"b": b, "length": length, "flops": prefill_flops(lens, lens)}
    for name, fn in list(fns.items()):
        try:
            r[f"{name}_first_ms"] = _wall_ms(fn)
        except Exception as e:  # a backend that does not take this shape (or GQA)
            r[f"{name}_error"] = repr(e)[:300]
            del fns[name]
            continue
        r[f"{name}_second_ms"] = _wall_ms(fn)
        r[f"{name}_ms"] = bench(fn)
    row(f"B={b} L={length}: " + " | ".join(
        f"{n} first {r[f'{n}_first_ms']:.1f} second {r[f'{n}_second_ms']:.2f} steady {r[f'{n}_ms']:.3f}" for n in fns
    ))  # fmt: skip
    return r


def prefill_sweep() -> list[dict]:
    sweep = []
    row("-- prefill config sweep (TF/s) --")
    cfgs = [ta.PrefillConfig(bm, bn, w, st) for bm, bn, w, st in
            ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2))]  # fmt: skip
    for cfg in cfgs:
        cells = []
        for lens, news in PREFILL_SWEEP_CASES:
            try:
                r = prefill_case(lens, news, cfg, sdpa=False)
                cells.append(f"{r['tflops']:.0f}")
            except Exception as e:
                r = {"lens": lens, "news": news, "error": repr(e)[:200], "config": cfg.__dict__}
                cells.append("err")
            sweep.append(r)
        row(
            f"bm={cfg.block_m} bn={cfg.block_n} w={cfg.num_warps} st={cfg.num_stages}: 1x4096 {cells[0]} | 8x512 {cells[1]} | 3584+512 {cells[2]}"
        )
    return sweep


def fused_section(copy_bw: float) -> list[dict]:
    row("\n== fused add+RMSNorm and rotary vs eager torch ==")
    out = []
    hidden, eps = HIDDEN, 1e-5
    w = torch.randn(hidden, device=DEV, dtype=DT)
    cos = torch.randn((MAX_POS, D // 2), device=DEV)
    sin = torch.randn((MAX_POS, D // 2), device=DEV)

    def eager_add_norm(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        s = x + r
        h = s.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(DT)

    def eager_rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c, s = cos[pos][:, None].to(DT), sin[pos][:, None].to(DT)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * torch.cat([c, c], -1) + torch.cat([-x2, x1], -1) * torch.cat([s, s], -1)

    for t in FUSED_TOKENS:
        x = torch.randn((t, hidden), device=DEV, dtype=DT)
        r = torch.randn((t, hidden), device=DEV, dtype=DT)
        want = eager_add_norm(x, r)
        got, _ = add_rms_norm(x, r.clone(), w, eps)
        ms_f = bench(lambda: add_rms_norm(x, r, w, eps))  # noqa: B023  (r drifts: timing only)
        ms_e = bench(lambda: eager_add_norm(x, r))  # noqa: B023
        qkv = torch.randn((t, (HQ + 2 * HKV) * D), device=DEV, dtype=DT)
        q = qkv[:, : HQ * D].view(t, HQ, D)
        k = qkv[:, HQ * D : (HQ + HKV) * D].view(t, HKV, D)
        pos = torch.randint(0, MAX_POS, (t,), device=DEV)
        ms_rf = bench(lambda: apply_rotary_(q, k, pos, cos, sin))  # noqa: B023
        ms_re = bench(lambda: (eager_rope(q, pos), eager_rope(k, pos)))  # noqa: B023
        res = {"T": t, "add_norm_ms": ms_f, "eager_add_norm_ms": ms_e, "norm_rel_err": rel(got, want),
               "rotary_ms": ms_rf, "eager_rotary_ms": ms_re}  # fmt: skip
        out.append(res)
        row(f"T={t:>5}: add+rmsnorm {ms_f * 1e3:7.1f} us (eager {ms_e * 1e3:7.1f}) err {res['norm_rel_err']:.1e} | "
            f"rotary q+k {ms_rf * 1e3:7.1f} us (eager {ms_re * 1e3:7.1f})")  # fmt: skip
    return out


def _smoke_shapes() -> None:
    global SMOKE, DEV, DT, HQ, HKV, D, DECODE_SHAPES, SWEEP_SHAPES, STORE_TOKENS, PREFILL_CASES
    global PREFILL_SWEEP_CASES, HIDDEN, MAX_POS, FUSED_TOKENS
    SMOKE, DEV, DT, HQ, HKV, D = True, "cpu", torch.float16, 4, 2, 32
    DECODE_SHAPES = [(1, 40), (3, 100)]
    SWEEP_SHAPES = [(2, 70)]
    STORE_TOKENS = (1, 5)
    PREFILL_CASES = [([40], [40]), ([30, 30], [30, 30]), ([90], [20])]
    PREFILL_SWEEP_CASES = (([40], [40]), ([30, 30], [30, 30]), ([90], [20]))
    HIDDEN, MAX_POS, FUSED_TOKENS = 64, 128, (1, 3)


def aot_report() -> None:
    """Compile every kernel for sm_90 on a machine WITHOUT a GPU (triton.compile needs none) and
    print registers, local memory (spills), shared memory and whether loads are 16 bytes wide /
    pipelined (cp.async) / on tensor cores. Catches compile errors before spending device time."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from shard.native.kernels import _triton_kernels as kern

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    ptr = {"*": "*bf16"}

    def compile_one(name: str, fn: object, types: dict[str, str], consts: dict, **opts: int) -> None:
        sig = {n: types.get(n, ptr["*"] if n.endswith("_ptr") else "i32") for n in fn.arg_names}
        for c in consts:
            sig[c] = "constexpr"
        # what the JIT would see at run time: 16-byte aligned pointers, strides divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n == "n_cols" or (n.startswith("stride") and n != "stride_bt")}  # fmt: skip
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=opts)  # fmt: skip
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        ptx = k.asm["ptx"]
        print(f"{name:34s} regs={m and m.group(1)} local={m and m.group(4)} smem={k.metadata.shared} "
              f"ld.v4={ptx.count('ld.global.v4')} cp.async={ptx.count('cp.async.cg')} "
              f"mma={ptx.count('mma.sync')} wgmma={ptx.count('wgmma.mma_async')}")  # fmt: skip

    f32 = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32", "eps": "fp32",
           "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "cu_seqlens_q_ptr": "*i32",
           "slot_mapping_ptr": "*i64", "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}  # fmt: skip
    for direct in (True, False):
        dc = ta.DecodeConfig()
        compile_one(f"decode direct={direct}", kern.decode_kernel, f32,
                    {"G_PAD": 16, "D": 128, "BLOCK_SIZE": 16, "BLOCK_N": dc.block_n, "DIRECT": direct},
                    num_warps=dc.num_warps, num_stages=dc.num_stages)  # fmt: skip
    compile_one(
        "decode_reduce",
        kern.decode_reduce_kernel,
        f32,
        {"D": 128, "BLOCK_N": 64, "SPLITS_PAD": 64},
        num_warps=4,
    )
    pc = ta.PrefillConfig()
    compile_one("prefill", kern.prefill_kernel, f32,
                {"D": 128, "BLOCK_SIZE": 16, "BLOCK_M": pc.block_m, "BLOCK_N": pc.block_n},
                num_warps=pc.num_warps, num_stages=pc.num_stages)  # fmt: skip
    compile_one(
        "store_kv",
        kern.store_kv_kernel,
        f32,
        {"HKV": 8, "HKV_PAD": 8, "D": 128, "BLOCK_SIZE": 16},
        num_warps=4,
    )
    compile_one(
        "rms_norm (+residual)", kern.rms_norm_kernel, f32, {"HAS_RESIDUAL": True, "BLOCK": 4096}, num_warps=16
    )
    compile_one("rotary", kern.rotary_kernel, f32, {"HQ_PAD": 32, "HK_PAD": 8, "HALF": 64}, num_warps=4)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels_bench.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="decode,sweep,store,prefill,prefill_sweep,fused")
    ap.add_argument("--decode-shapes", default="", help="e.g. 1x16,1x1024: replaces the decode list")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: checks the script"
    )
    ap.add_argument(
        "--aot", action="store_true", help="no GPU needed: compile for sm_90 and report resources"
    )
    args = ap.parse_args()
    if args.aot:
        aot_report()
        return 0
    if args.smoke:
        _smoke_shapes()
    torch.manual_seed(0)
    info = {
        "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (interpreter)",
        "sms": num_sms(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    row(f"{info}")
    results: dict = {"info": info, "ceilings": ceilings()}
    copy_bw = results["ceilings"]["copy_bw_Bps"]
    sections = args.sections.split(",")
    if args.decode_shapes:
        global DECODE_SHAPES
        DECODE_SHAPES = [tuple(int(x) for x in item.split("x")) for item in args.decode_shapes.split(",")]

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    if "decode" in sections:
        results["decode"] = decode_section(copy_bw, args.quick)
        save()
    if "store" in sections:
        results["store_kv"] = store_section(copy_bw)
        save()
    if "prefill" in sections:
        results["prefill"] = prefill_section(args.quick)
        save()
    if "first_call" in sections:
        results["first_call"] = first_call_section()
        save()
    if "prefill_sweep" in sections:
        results["prefill_sweep"] = prefill_sweep()
        save()
    if "fused" in sections:
        results["fused"] = fused_section(copy_bw)
        save()
    if "sweep" in sections:
        results["decode_sweep"] = decode_sweep(copy_bw, args.quick)
        save()
    print("\n\n======== SUMMARY ========")
    print("\n".join(ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
