"""Tensor parallel (TP=2, gloo on CPU, two spawned processes) gives the logits of TP=1 on the same
weights, on every rank: prefill and a decode step, for a safetensors folder (sliced at load with
get_slice), dummy weights (drawn whole, then sliced) and a full model sharded after loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from native_helpers import Seq, build_batch, perturbed_state_dict, tiny_config
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
    os.environ["SHARD_ONE_SHOT_ALLREDUCE"] = "1"  # opt-in path, checked below on CUDA
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
        if backend == "nccl":  # the one-shot all-reduce (symmetric memory), eager and graph-captured
            assert full.tp_reduce.enable_one_shot(device, torch.float32)
            results["one-shot"] = run_steps(full, config)
            results["one-shot-graph"] = one_shot_graph_replays(full.tp_reduce, rank, device)
        torch.save(results, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def one_shot_graph_replays(reduce, rank: int, device: torch.device) -> list[torch.Tensor]:
    """Captures one in-place reduce of a (4, 96) tensor in a CUDA graph and replays it on new
    values: rank r holds (r + 1) * v, so every rank must read 3 * v (two ranks)."""
    x = torch.zeros(4, 96, device=device)
    reduce(x)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reduce(x)
    out = []
    for v in (1.0, 2.5):
        x.fill_((rank + 1) * v)
        graph.replay()
        out.append(x.cpu().clone())
    return out


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
        expected["one-shot"] = expected["safetensors"]
        expected["one-shot-graph"] = [torch.full((4, 96), 3.0 * v) for v in (1.0, 2.5)]

    mp.spawn(tp_worker, args=(str(root), backend), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        got = torch.load(root / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for name, steps in expected.items():
            for step, (a, b) in enumerate(zip(got[name], steps, strict=True)):
                assert a.shape == b.shape, (name, step)
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"rank {rank} {name} step {step}")


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
