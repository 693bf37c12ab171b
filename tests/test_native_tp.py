"""Tensor parallel (TP=2, gloo on CPU, two spawned processes) gives the logits of TP=1 on the same
weights, on every rank: prefill and a decode step, for a safetensors folder (sliced at load with
get_slice), dummy weights (drawn whole, then sliced) and a full model sharded after loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from native_helpers import Seq, build_batch, leave_together, perturbed_state_dict, tiny_config
from safetensors.torch import save_file

from shard.engine.base import EngineConfigError
from shard.native.kv_cache import KVCache
from shard.native.loader import load_model
from shard.native.tp import TPGroup, apply_tensor_parallel, shard_range, unit_range

WORLD = 2
BLOCK = 4
CPU = torch.device("cpu")


def make_cases(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (model folder, load format)."""
    # Odd vocabulary (uneven vocab shards), tied head, o_proj bias (kept by rank 0 only).
    llama = tiny_config(vocab_size=301, tie_word_embeddings=True, attention_bias=True)
    st_dir = root / "llama-st"
    st_dir.mkdir()
    sd = perturbed_state_dict(llama)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st_dir / "model.safetensors"))
    (st_dir / "config.json").write_text(json.dumps(llama.to_hf_dict()))
    dummy_dir = root / "qwen2-dummy"
    dummy_dir.mkdir()
    (dummy_dir / "config.json").write_text(json.dumps(tiny_config(model_type="qwen2").to_hf_dict()))
    # SmolLM2-like uneven split: 3 kv heads (2 q heads each) and 130 MLP features over 2 ranks.
    uneven_dir = root / "uneven-dummy"
    uneven_dir.mkdir()
    uneven = tiny_config(num_attention_heads=6, num_key_value_heads=3, intermediate_size=130)
    (uneven_dir / "config.json").write_text(json.dumps(uneven.to_hf_dict()))
    return {
        "safetensors": (str(st_dir), "auto"),
        "dummy": (str(dummy_dir), "dummy"),
        "uneven": (str(uneven_dir), "dummy"),
    }


def run_steps(model, config) -> list[torch.Tensor]:
    """Prefill two sequences (all positions' logits), then one decode step; results on the CPU."""
    device = model.embed_tokens.weight.device
    cache = KVCache.allocate(
        num_layers=config.num_layers,
        num_blocks=16,
        block_size=BLOCK,
        num_kv_heads=model.num_local_kv_heads,
        head_dim=config.head_dim,
        dtype=torch.float32,
        device=device,
    )
    seqs = [Seq([5, 17, 99, 3, 250, 8, 41], 0, [9, 2, 12]), Seq([7, 7, 120, 64, 1], 0, [4, 11])]
    prefill = model(
        build_batch(seqs, block_size=BLOCK, is_prefill=True, all_logits=True, device=device), cache
    )
    for s, tok in zip(seqs, (33, 201), strict=True):
        s.num_cached = len(s.tokens)
        s.tokens.append(tok)
    decode = model(build_batch(seqs, block_size=BLOCK, is_prefill=False, device=device), cache)
    return [prefill.cpu(), decode.cpu()]


def tp_worker(rank: int, root: str, backend: str) -> None:
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else CPU
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        tp = TPGroup(rank=rank, size=WORLD, group=dist.group.WORLD)
        results = {}
        for name, (folder, fmt) in make_cases_cached(Path(root)).items():
            model, config = load_model(folder, dtype=torch.float32, device=device, tp=tp, load_format=fmt)
            u0, u1 = unit_range(config.num_kv_heads, tp)
            assert model.num_local_kv_heads == u1 - u0
            results[name] = run_steps(model, config)
        # Transformation after build: load whole, then shard in place.
        folder, fmt = make_cases_cached(Path(root))["safetensors"]
        full, config = load_model(folder, dtype=torch.float32, device=device, tp=TPGroup.single())
        apply_tensor_parallel(full, tp)
        results["sharded-after-load"] = run_steps(full, config)
        if backend == "nccl":  # the fused forward, its reduces riding in the norms (eager, graphed)
            assert full.tp_reduce.enable_fused(device, torch.float32, config.hidden_size)
            full.enable_fused_kernels()
            results["fused-reduce"] = run_steps(full, config)
            results["fused-graph"] = fused_graph_replays(full.tp_reduce, rank, device, config.hidden_size)
        torch.save(results, f"{root}/rank{rank}.pt")
        leave_together()
    finally:
        dist.destroy_process_group()


def fused_graph_replays(reduce, rank: int, device: torch.device, hidden: int) -> list[torch.Tensor]:
    """One forward's worth of fused reduce + add + norm calls (two: both buffer halves) captured in
    a CUDA graph and replayed on new values. Rank r's partial is (r + 1) * v: the sum is 3 * v
    (two ranks), so the residual ends at r0 + 6 * v and the second output is its norm."""
    x = torch.zeros(4, hidden, device=device)
    res = torch.zeros(4, hidden, device=device)
    weight = torch.linspace(0.5, 1.5, hidden, device=device)

    def forward() -> torch.Tensor:
        with reduce.forward(x.shape[0], x.dtype) as add_norm:
            add_norm(x, res, weight, 1e-6)
            out, _ = add_norm(x, res, weight, 1e-6)
        return out

    forward()  # warm-up outside capture (compiles the kernel on both halves)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    got = []
    for v in (1.0, 2.5, -0.75):
        x.fill_((rank + 1) * v)
        res.copy_(torch.arange(4 * hidden, device=device, dtype=torch.float32).view(4, hidden) / hidden)
        graph.replay()
        got += [out.cpu().clone(), res.cpu().clone()]
    return got


def fused_graph_expected(hidden: int) -> list[torch.Tensor]:
    weight = torch.linspace(0.5, 1.5, hidden)
    want = []
    for v in (1.0, 2.5, -0.75):
        res = torch.arange(4 * hidden, dtype=torch.float32).view(4, hidden) / hidden + 6 * v
        normed = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + 1e-6)
        want += [normed * weight, res]
    return want


def make_cases_cached(root: Path) -> dict[str, tuple[str, str]]:
    # The parent creates the folders; workers only read their names.
    return json.loads((root / "cases.json").read_text())


def check_tp2_matches_tp1(root: Path, backend: str) -> None:
    device = torch.device("cuda:0") if backend == "nccl" else CPU
    cases = make_cases(root)
    (root / "cases.json").write_text(json.dumps(cases))
    expected = {}
    for name, (folder, fmt) in cases.items():
        model, config = load_model(
            folder, dtype=torch.float32, device=device, tp=TPGroup.single(), load_format=fmt
        )
        expected[name] = run_steps(model, config)
    expected["sharded-after-load"] = expected["safetensors"]
    if backend == "nccl":
        expected["fused-reduce"] = expected["safetensors"]
        hidden = json.loads((Path(cases["safetensors"][0]) / "config.json").read_text())["hidden_size"]
        expected["fused-graph"] = fused_graph_expected(hidden)

    mp.spawn(tp_worker, args=(str(root), backend), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        got = torch.load(root / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for name, steps in expected.items():
            for step, (a, b) in enumerate(zip(got[name], steps, strict=True)):
                assert a.shape == b.shape, (name, step)
                # the fused forward's Triton norm and rotary round differently from eager (~1e-5)
                atol = 1e-3 if name.startswith("fused") else 1e-4
                torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"rank {rank} {name} step {step}")


@pytest.mark.timeout(180)
def test_tp2_gloo_matches_tp1(tmp_path):
    check_tp2_matches_tp1(tmp_path, "gloo")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.timeout(300)
def test_tp2_nccl_matches_tp1_cuda(tmp_path):
    check_tp2_matches_tp1(tmp_path, "nccl")


def test_shard_range_and_divisibility():
    # vocab 301 over 2 ranks: 151 rows each, the last one padded by one zero row
    assert shard_range(301, TPGroup(rank=0, size=2, group=None)) == (0, 151, 151)
    assert shard_range(301, TPGroup(rank=1, size=2, group=None)) == (151, 301, 151)
    # 3 kv heads of 2 q heads (head_dim 16) over 2 ranks: whole groups, 2 then 1
    assert shard_range(96 + 48 + 48, TPGroup(rank=0, size=2, group=None), units=3)[:2] == (0, 128)
    assert shard_range(9, TPGroup(rank=1, size=2, group=None), units=3) == (6, 9, 3)
    assert unit_range(1536, TPGroup(rank=1, size=2, group=None)) == (768, 1536)
    with pytest.raises(EngineConfigError, match="num_key_value_heads"):
        load_model("llama-tiny", dtype=torch.float32, device=CPU, tp=TPGroup(rank=0, size=4, group=None))


# -- the fused forward's deferred reduces, on the CPU --------------------------------------------
# The fused forward (model._forward_fused) normally needs Triton; eager stand-ins with the same
# contracts let the CPU check its wiring: with a reducer that defers, the row-parallel hooks leave
# partial sums and every norm sums them instead. The stand-in for the Lamport kernel is a gloo
# all-reduce plus the eager add + norm, and it records which buffer half each call would use.


def _eager_norm(x, residual, weight, eps):
    if residual is not None:
        s = (x.float() + residual.float()).to(residual.dtype)
        residual.copy_(s)
        x = s
    h = x.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def _eager_rotary(q, k, positions, cos, sin):
    from shard.native.model import apply_rope

    c, s = cos[positions], sin[positions]
    c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
    q.copy_(apply_rope(q, c, s))
    k.copy_(apply_rope(k, c, s))


def _eager_silu_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class _GlooLamport:
    """What fast_allreduce expects of its fused kernel, as a gloo all-reduce + eager add + norm."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows, self.dtype, self.halves = max_rows, torch.float32, []

    def __call__(self, x, residual, weight, eps, half):
        self.halves.append(half)
        summed = x.clone()
        dist.all_reduce(summed)
        return _eager_norm(summed, residual, weight, eps)


def deferred_worker(rank: int, root: str) -> None:
    import shard.native.kernels.activation as activation
    import shard.native.kernels.norm as norm
    import shard.native.kernels.rotary as rotary

    torch.set_num_threads(1)
    norm._launch, rotary.apply_rotary_, activation.silu_mul = _eager_norm, _eager_rotary, _eager_silu_mul
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        folder, fmt = make_cases_cached(Path(root))["safetensors"]
        model, config = load_model(folder, dtype=torch.float32, device=CPU, tp=TPGroup(rank, WORLD, dist.group.WORLD))
        model.enable_fused_kernels()
        results = {}
        for max_rows in (64, 4):  # 64: every forward defers; 4: the 12-token prefill does not
            fused = _GlooLamport(max_rows)
            model.tp_reduce._fused = fused
            results[f"max_rows={max_rows}"] = run_steps(model, config)
            results[f"halves max_rows={max_rows}"] = torch.tensor(fused.halves)
        torch.save(results, f"{root}/deferred{rank}.pt")
        leave_together()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_tp2_reduces_deferred_into_norms_match_tp1(tmp_path):
    """Prefill (12 tokens) and one decode step (2 rows) of a 2-layer model: the logits equal TP=1's
    whether the reduces ride in the norms or not; each deferring forward makes 2 x layers fused
    calls whose buffer halves alternate from 0 (an even count, so the next forward starts at 0)."""
    cases = make_cases(tmp_path)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    folder, fmt = cases["safetensors"]
    model, config = load_model(folder, dtype=torch.float32, device=CPU, tp=TPGroup.single())
    want = run_steps(model, config)
    mp.spawn(deferred_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    per_forward = [i % 2 for i in range(2 * config.num_layers)]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"deferred{rank}.pt")
        for max_rows in (64, 4):
            for step, (a, b) in enumerate(zip(got[f"max_rows={max_rows}"], want, strict=True)):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"rank {rank} max_rows {max_rows} step {step}")
        assert got["halves max_rows=64"].tolist() == per_forward * 2  # prefill and decode deferred
        assert got["halves max_rows=4"].tolist() == per_forward  # the decode step only


def test_reduce_defers_only_inside_a_forward_that_fits():
    from shard.native.fast_allreduce import RowParallelReduce

    reduce = RowParallelReduce(None)
    reduce._fused = _GlooLamport(max_rows=8)
    t = torch.ones(3, 4)
    with reduce.forward(8, torch.float32):
        assert reduce(t) is t  # the hook leaves partial sums (no process group needed)
    one_call = _GlooLamport(max_rows=8)
    one_call.__class__ = type("NoReduce", (_GlooLamport,), {"__call__": lambda self, x, r, w, eps, half: x})
    reduce._fused = one_call
    with pytest.raises(AssertionError, match="1 fused reduces"):
        with reduce.forward(8, torch.float32) as add_norm:
            add_norm(t, t.clone(), torch.ones(4), 1e-6)  # one call: an odd count is refused
    assert not reduce._defer
    with pytest.raises(ValueError, match="process group"):  # too many rows: the hook all-reduces
        with reduce.forward(9, torch.float32):
            reduce(t)
