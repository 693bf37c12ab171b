"""NativeEngine (prefill/decode loop, paged KV, sampler wiring) against transformers on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from shard.engine.base import InvalidRequestError
from shard.engine.types import FinishReason, NewRequest, SamplingParams, StoppingParams, WarmupSpec
from shard.native.engine import NativeEngine, RuntimeOptions
from shard.native.loader import load_model
from shard.native.tp import TPGroup
from tests.native_helpers import perturbed_state_dict, save_hf_model, tiny_config

BS = 4  # small blocks so sequences span many, non-contiguous blocks


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = tiny_config(eos_token_id=299)
    folder = tmp_path_factory.mktemp("tiny")
    hf = save_hf_model(config, perturbed_state_dict(config, seed=3), folder)
    model, mc = load_model(str(folder), dtype=torch.float32, device=torch.device("cpu"), tp=TPGroup.single())
    return hf, model, mc


def make_engine(models, overlap: bool | None = None) -> NativeEngine:
    _, model, mc = models
    eng = NativeEngine(
        model=model,
        model_config=mc,
        options=RuntimeOptions(model_id="tiny", block_size=BS, kv_cache_tokens=4 * 256, overlap_decode=overlap),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    eng.warmup(WarmupSpec(max_input_tokens=100, max_total_tokens=200, max_batch_prefill_tokens=400, max_batch_size=8))
    return eng


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


class Blocks:
    """Hands out deliberately scattered block ids."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n - 1, -1, -1))[::2] + list(range(n - 1, -1, -1))[1::2]

    def take(self, k: int) -> list[int]:
        out, self.free = self.free[:k], self.free[k:]
        return out


def req(rid: int, prompt: list[int], n: int, blocks: Blocks, *, prefix_len: int = 0, pre: list[int] | None = None,
        **kw) -> NewRequest:
    table = (pre or []) + blocks.take(math.ceil((len(prompt) + n + 1) / BS) - len(pre or []))
    return NewRequest(
        id=rid, input_ids=tuple(prompt), sampling=SamplingParams(**kw), stopping=StoppingParams(max_new_tokens=n,
        ignore_eos_token=True), blocks=tuple(table), prefix_len=prefix_len,
    )


def run_to_end(eng: NativeEngine, reqs: list[NewRequest], steps: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {r.id: [] for r in reqs}
    for g in eng.prefill(reqs).generations:
        out[g.request_id].append(g.token_id)
    while eng.seqs:
        for g in eng.decode({}, steps).generations:
            out[g.request_id].append(g.token_id)
    return out


@pytest.mark.parametrize("steps", [1, 3])
def test_batched_greedy_equals_transformers(models, steps):
    hf = models[0]
    eng = make_engine(models)
    blocks = Blocks(eng.kv.num_blocks - 1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (5, 17, 9)]
    lens = [7, 12, 4]
    reqs = [req(i + 1, p, n, blocks) for i, (p, n) in enumerate(zip(prompts, lens, strict=True))]
    out = run_to_end(eng, reqs, steps)
    for r, p, n in zip(reqs, prompts, lens, strict=True):
        assert out[r.id] == hf_greedy(hf, p, n)


def test_join_between_steps_and_prefix_reuse(models):
    """A request joins a running batch; another reuses the first one's cached prefix blocks."""
    hf = models[0]
    eng = make_engine(models)
    blocks = Blocks(eng.kv.num_blocks - 1)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(3, 290, (13,), generator=g).tolist()
    ra = req(1, a, 10, blocks)
    first = [eng.prefill([ra]).generations[0].token_id]
    first += [x.token_id for x in eng.decode({}, 2).generations]
    # B shares A's first 2 full blocks (8 tokens): only the rest is computed.
    b = a[:8] + torch.randint(3, 290, (6,), generator=g).tolist()
    rb = req(2, b, 5, blocks, prefix_len=8, pre=list(ra.blocks[:2]))
    out_b = [eng.prefill([rb]).generations[0].token_id]
    while eng.seqs:
        for x in eng.decode({}, 1).generations:
            (first if x.request_id == 1 else out_b).append(x.token_id)
    assert first == hf_greedy(hf, a, 10)
    assert out_b == hf_greedy(hf, b, 5)


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_prefills_equal_transformers(models, overlap):
    """Requests join through mixed prefills (the running batch's step rides in the prompt forward),
    back to back and after a multi-step decode (whose last step is carried when overlap is on); one
    joins with prompt logprobs. Every token equals transformers' greedy run of that request alone."""
    hf = models[0]
    eng = make_engine(models, overlap=overlap)
    blocks = Blocks(eng.kv.num_blocks - 1)
    g = torch.Generator().manual_seed(6)  # a seed whose greedy runs never emit EOS (hf_greedy forbids it)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (13, 9, 20, 6)]
    lens = [14, 9, 6, 5]
    reqs = [req(i + 1, p, n, blocks) for i, (p, n) in enumerate(zip(prompts, lens, strict=True))]
    reqs[2] = NewRequest(**{**reqs[2].__dict__, "prefill_logprobs": True})
    out: dict[int, list[int]] = {r.id: [] for r in reqs}

    def take(gens) -> None:  # noqa: ANN001
        for x in gens:
            out[x.request_id].append(x.token_id)

    take(eng.prefill([reqs[0]]).generations)
    take(eng.decode({}, 3).generations)
    mixed = eng.prefill([reqs[1]], decode_running={})
    assert [x.request_id for x in mixed.decode_generations] == [1] * (2 if overlap else 1)  # + the carried step
    take(mixed.decode_generations)
    take(mixed.generations)
    mixed = eng.prefill([reqs[2], reqs[3]], decode_running={})  # back to back, two join at once
    assert sorted(x.request_id for x in mixed.decode_generations) == [1, 2]
    take(mixed.decode_generations)
    take(mixed.generations)
    logprobs = mixed.generations[0].prefill_tokens
    ref = torch.log_softmax(hf(torch.tensor([prompts[2]])).logits[0].float(), -1)
    expect = [ref[i - 1, prompts[2][i]].item() for i in range(1, len(prompts[2]))]
    assert logprobs.ids == tuple(prompts[2]) and logprobs.logprobs[1:] == pytest.approx(expect, abs=1e-4)
    while eng.seqs:
        take(eng.decode({}, 2).generations)
    for r, p, n in zip(reqs, prompts, lens, strict=True):
        assert out[r.id] == hf_greedy(hf, p, n), r.id


def test_a_mixed_step_needs_room_for_the_running_tokens(models):
    eng = make_engine(models)
    blocks = Blocks(eng.kv.num_blocks - 1)
    tight = NewRequest(id=1, input_ids=(5, 6, 7), sampling=SamplingParams(), stopping=StoppingParams(max_new_tokens=9),
                       blocks=tuple(blocks.take(1)))  # 4 slots: the prompt and the first token's K/V
    eng.prefill([tight])
    eng.prefill([req(2, [8, 9], 3, blocks)], decode_running={})  # writes the first token into slot 3
    with pytest.raises(InvalidRequestError, match="no room"):
        eng.prefill([req(3, [10, 11], 3, blocks)], decode_running={})
    with pytest.raises(InvalidRequestError, match="unknown request"):
        eng.prefill([req(4, [10, 11], 3, blocks)], decode_running={42: [1]})
    got = eng.prefill([req(5, [10, 11], 3, blocks)], decode_running={1: blocks.take(1)})
    assert sorted(x.request_id for x in got.decode_generations) == [1, 2]


def test_stops_and_prompt_logprobs(models):
    hf = models[0]
    eng = make_engine(models)
    blocks = Blocks(eng.kv.num_blocks - 1)
    prompt = list(range(10, 30))
    greedy = hf_greedy(hf, prompt, 6)
    r = NewRequest(id=7, input_ids=tuple(prompt), sampling=SamplingParams(),
                   stopping=StoppingParams(max_new_tokens=6, stop_token_ids=(greedy[2],)),
                   blocks=tuple(blocks.take(8)), prefill_logprobs=True, top_n_tokens=3)
    pre = eng.prefill([r]).generations[0]
    assert pre.prefill_tokens.ids == tuple(prompt)
    assert math.isnan(pre.prefill_tokens.logprobs[0])
    ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    expect = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert pre.prefill_tokens.logprobs[1:] == pytest.approx(expect, abs=1e-4)
    assert len(pre.top_tokens.ids) == 3 and pre.top_tokens.ids[0] == greedy[0]
    gens = [pre] + eng.decode({}, 8).generations
    assert [x.token_id for x in gens] == greedy[:3]
    assert gens[-1].finish_reason is FinishReason.EOS_TOKEN and not eng.seqs


def test_cpu_engine_sets_no_batch_limit_of_its_own(models):
    # On CUDA the limit is the largest CUDA-graph batch (MAX_GRAPH_BATCH); on CPU there is none.
    assert make_engine(models).info().max_batch_size == 0
    assert make_engine(models).graph_max_batch(WarmupSpec(10, 20, 40, 8)) == 0  # no graphs, no memory kept


def test_length_finish_and_filter(models):
    eng = make_engine(models)
    blocks = Blocks(eng.kv.num_blocks - 1)
    r1, r2 = req(1, [5, 6, 7], 2, blocks), req(2, [8, 9], 50, blocks)
    eng.prefill([r1, r2])
    gens = eng.decode({}, 1).generations
    assert {g.request_id: g.finish_reason for g in gens} == {1: FinishReason.LENGTH, 2: None}
    assert eng.filter([2, 99]) == 0


def test_invalid_requests(models):
    eng = make_engine(models)
    with pytest.raises(InvalidRequestError, match="blocks"):
        eng.prefill([NewRequest(id=1, input_ids=(1, 2, 3, 4, 5), sampling=SamplingParams(),
                                stopping=StoppingParams(max_new_tokens=3), blocks=(0,))])
    with pytest.raises(InvalidRequestError, match="unknown request"):
        eng.decode({42: [1]}, 1)


def test_seeded_sampling_is_reproducible_and_batch_independent(models):
    eng = make_engine(models)
    blocks = Blocks(eng.kv.num_blocks - 1)
    kw = dict(do_sample=True, temperature=1.5, top_k=50, seed=1234)
    alone = run_to_end(eng, [req(1, [4, 5, 6], 8, blocks, **kw)], 1)[1]
    eng2 = make_engine(models)
    blocks2 = Blocks(eng2.kv.num_blocks - 1)
    together = run_to_end(eng2, [req(1, [9, 9], 5, blocks2, do_sample=True, seed=7),
                                 req(2, [4, 5, 6], 8, blocks2, **kw)], 2)[2]
    assert alone == together


def test_overlapped_decode_gives_the_plain_loops_generations(models):
    """The host-one-step-behind loop (on by default on CUDA) run on CPU: the same tokens, logprobs
    and finish reasons as the plain loop, an EOS end drops the token already computed after it,
    and a call never runs past a LENGTH end."""
    hf = models[0]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (6, 11, 8, 3)]
    greedy0 = hf_greedy(hf, prompts[0], 9)

    def requests(blocks: Blocks) -> list[NewRequest]:
        reqs = [req(i + 1, p, n, blocks) for i, (p, n) in enumerate(zip(prompts[1:], (9, 3, 7), strict=True))]
        reqs[2] = req(4, prompts[3], 7, blocks, do_sample=True, temperature=0.9, seed=7, repetition_penalty=1.3)
        eos = NewRequest(id=9, input_ids=tuple(prompts[0]), sampling=SamplingParams(),
                         stopping=StoppingParams(max_new_tokens=9, stop_token_ids=(greedy0[4],)),
                         blocks=tuple(blocks.take(5)), top_n_tokens=2)
        return [eos, *reqs]

    def run(overlap: bool) -> tuple[list[tuple], list[int]]:
        eng = make_engine(models, overlap=overlap)
        blocks = Blocks(eng.kv.num_blocks - 1)
        gens = list(eng.prefill(requests(blocks)).generations)
        steps = []
        while eng.seqs:
            res = eng.decode({}, 4)
            steps.append(res.steps)
            gens += res.generations
        return [(x.request_id, x.token_id, round(x.logprob, 4), x.finish_reason, x.top_tokens.ids) for x in gens], steps

    plain, _ = run(False)
    overlapped, steps = run(True)
    assert sorted(overlapped, key=lambda x: x[0]) == sorted(plain, key=lambda x: x[0])
    ended = [x for x in overlapped if x[0] == 9]
    assert [x[1] for x in ended] == greedy0[: greedy0.index(greedy0[4]) + 1]
    assert ended[-1][3] is FinishReason.EOS_TOKEN
    # request 2 ends by LENGTH after 3 tokens (1 at prefill), at the first call's second step, and
    # request 9 by EOS at the second call: both ride along, and the calls run their 4 steps
    assert steps[:2] == [4, 4]


def test_an_ended_sequence_leaves_the_device_batch_mid_call_without_a_rebuild(models, monkeypatch):
    """A sequence that ends rides one step (launched before its end was read), then a gather on
    the device drops it from the batch: its blocks need room for that one step only, the call
    runs all its steps and still carries, and the batch is never rebuilt on the host."""
    from shard.native import batch as batch_mod

    hf = models[0]
    g = torch.Generator().manual_seed(6)
    long_prompt, short_prompt = (torch.randint(3, 290, (n,), generator=g).tolist() for n in (5, 2 * BS - 3))
    eng = make_engine(models, overlap=True)
    blocks = Blocks(eng.kv.num_blocks - 1)
    # short: 2 new tokens and blocks for exactly prompt + 2 tokens + 1 (the one step it rides)
    short = NewRequest(id=2, input_ids=tuple(short_prompt), sampling=SamplingParams(),
                       stopping=StoppingParams(max_new_tokens=2, ignore_eos_token=True), blocks=tuple(blocks.take(2)))
    long = req(1, long_prompt, 9, blocks)
    gens = {1: [], 2: []}
    for x in eng.prefill([long, short]).generations:
        gens[x.request_id].append(x.token_id)
    built = []
    real_init = batch_mod.DecodeBatch.__init__
    monkeypatch.setattr(batch_mod.DecodeBatch, "__init__", lambda self, **kw: (built.append(1), real_init(self, **kw))[1])
    first = eng.decode({}, 4)
    # the short one ended at step 1 and rode step 2; steps 3 and 4 ran without it
    assert first.steps == 4 and [s.id for s in eng._decode_rows] == [1]
    assert eng._carried is not None and len(built) == 1  # the first launch's build only
    for x in first.generations:
        gens[x.request_id].append(x.token_id)
    while eng.seqs:
        for x in eng.decode({}, 4).generations:
            gens[x.request_id].append(x.token_id)
    assert len(built) == 1
    assert gens == {1: hf_greedy(hf, long_prompt, 9), 2: hf_greedy(hf, short_prompt, 2)}


def test_decode_batch_select_gathers_rows_after_an_advance():
    """DecodeBatch.select keeps the chosen rows of the device state as advanced so far (pending
    token, position, block table) and renumbers the rest: the batch a launch after _compact sees."""
    from shard.native.batch import DecodeBatch

    db = DecodeBatch(last_tokens=[5, 6, 7], kv_lens=[3, 17, 9], block_tables=[[1], [2, 3], [4]],
                     block_size=16, device=torch.device("cpu"), width=4)  # fmt: skip
    db.advance(torch.tensor([50, 60, 70]))
    kept = db.select([2, 0], max_kv=10)
    assert kept.input_ids.tolist() == [70, 50] and kept.positions.tolist() == [10, 4]
    assert kept.block_tables.tolist() == [[4, 0, 0, 0], [1, 0, 0, 0]]
    fb = kept.forward_batch()
    assert fb.slot_mapping.tolist() == [4 * 16 + 10, 1 * 16 + 4] and fb.seq_lens.tolist() == [11, 5]
    assert fb.cu_seqlens_q.tolist() == [0, 1, 2] and fb.logits_indices.tolist() == [0, 1]
    assert fb.max_seqlen_k == 11 and db.input_ids.tolist() == [50, 60, 70]  # the old batch is untouched


def test_carried_step_survives_prefill_filter_and_extensions(models):
    """The overlapped loop leaves its last step in flight when a call returns; Prefill, FilterBatch
    and block extensions read it first and the next Decode returns its tokens. Every request
    still gets its solo greedy tokens, in order, and no call returns more than max_steps + 1."""
    hf = models[0]
    g = torch.Generator().manual_seed(8)
    pa, pb, pc = (torch.randint(3, 290, (n,), generator=g).tolist() for n in (7, 5, 9))
    eng = make_engine(models, overlap=True)
    blocks = Blocks(eng.kv.num_blocks - 1)
    got: dict[int, list[int]] = {1: [], 2: [], 3: []}

    def take(gens) -> None:
        per_call: dict[int, int] = {}
        for x in gens:
            got[x.request_id].append(x.token_id)
            per_call[x.request_id] = per_call.get(x.request_id, 0) + 1
        assert all(n <= 5 for n in per_call.values()), per_call

    # A has blocks for its prompt + 9 tokens only; the rest comes as a block extension later
    a = NewRequest(id=1, input_ids=tuple(pa), sampling=SamplingParams(),
                   stopping=StoppingParams(max_new_tokens=20, ignore_eos_token=True),
                   blocks=tuple(blocks.take(math.ceil((len(pa) + 10) / BS))))
    take(eng.prefill([a]).generations)
    take(eng.decode({}, 4).generations)
    assert eng._carried is not None  # nobody ended: the last step stays in flight
    take(eng.prefill([req(2, pb, 6, blocks), req(3, pc, 15, blocks)]).generations)  # reads it first
    assert eng._carried is None and [x.request_id for x in eng._orphans] == [1]
    take(eng.decode({}, 4).generations)
    assert eng._carried is not None
    eng.filter([3])
    take(eng.decode({}, 4).generations)
    take(eng.decode({1: blocks.take(4)}, 4).generations)
    while eng.seqs:
        take(eng.decode({}, 4).generations)
    assert got[1] == hf_greedy(hf, pa, 20)
    assert got[2] == hf_greedy(hf, pb, 6)
    assert got[3] == hf_greedy(hf, pc, 15)[: len(got[3])] and 0 < len(got[3]) < 15


def test_block_extensions_go_into_the_running_batch_without_settling(models):
    """A Decode's block extensions are written into the device batch's block table in place: the
    carried step stays in flight (no _settle) and the batch is not rebuilt. A list wider than the
    table's spare columns falls back to settle + rebuild. Tokens stay transformers' either way."""
    from shard.native.decode_steps import TABLE_HEADROOM

    hf = models[0]
    g = torch.Generator().manual_seed(22)  # prompts whose 40 greedy tokens have no fp32 near-tie
    pa, pb = (torch.randint(3, 290, (n,), generator=g).tolist() for n in (7, 12))
    eng = make_engine(models, overlap=True)
    blocks = Blocks(eng.kv.num_blocks - 1)
    n_new = 40  # A grows through several blocks, one extension at a time
    a = NewRequest(id=1, input_ids=tuple(pa), sampling=SamplingParams(),
                   stopping=StoppingParams(max_new_tokens=n_new, ignore_eos_token=True),
                   blocks=tuple(blocks.take(math.ceil((len(pa) + 6) / BS))))  # fmt: skip
    got: dict[int, list[int]] = {1: [], 2: []}
    settles = []
    real_settle = eng._settle
    eng._settle = lambda: (settles.append(eng._carried is not None), real_settle())  # type: ignore[method-assign]
    for x in eng.prefill([a, req(2, pb, 30, blocks)]).generations:
        got[x.request_id].append(x.token_id)
    for x in eng.decode({}, 4).generations:
        got[x.request_id].append(x.token_id)
    in_place = 0
    while eng.seqs:
        seq = eng.seqs.get(1)
        # what the router does: grow A to cover the next call's steps (+1 carried), a block at a time
        need = 0 if seq is None else math.ceil((seq.kv_len + 4 + 2) / BS) - len(seq.blocks)
        before, carried = eng._decode_batch, eng._carried is not None
        ext = {1: blocks.take(need)} if need > 0 else {}
        for x in eng.decode(ext, 4).generations:
            got[x.request_id].append(x.token_id)
        if ext and before is not None and carried:
            in_place += 1
            assert eng._decode_batch is before or 2 not in eng.seqs  # rebuilt only when B ended
    assert in_place >= 2 and not any(settles), settles  # no extension settled a step in flight
    assert got == {1: hf_greedy(hf, pa, n_new), 2: hf_greedy(hf, pb, 30)}

    # An extension wider than the spare columns: settle, then rebuild with the longer list.
    eng2 = make_engine(models, overlap=True)
    blocks2 = Blocks(eng2.kv.num_blocks - 1)
    c = NewRequest(id=3, input_ids=tuple(pa), sampling=SamplingParams(),
                   stopping=StoppingParams(max_new_tokens=8, ignore_eos_token=True),
                   blocks=tuple(blocks2.take(math.ceil((len(pa) + 6) / BS))))  # fmt: skip
    out = [x.token_id for x in eng2.prefill([c]).generations]
    out += [x.token_id for x in eng2.decode({}, 4).generations]
    table = eng2._decode_batch
    wide = eng2._decode_batch.block_tables.shape[1] - len(eng2.seqs[3].blocks) + 1
    assert wide > TABLE_HEADROOM - 1
    out += [x.token_id for x in eng2.decode({3: blocks2.take(wide)}, 4).generations]
    assert eng2._decode_batch is not table  # rebuilt
    while eng2.seqs:
        out += [x.token_id for x in eng2.decode({}, 4).generations]
    assert out == hf_greedy(hf, pa, 8)


def test_a_request_that_ended_in_a_carried_step_may_still_get_blocks(models):
    """A ends inside the step carried over a Prefill; the router, not told yet, grows it at the
    next Decode: the extension is ignored and that Decode reports the end."""
    hf = models[0]
    g = torch.Generator().manual_seed(13)
    pa, pb = (torch.randint(3, 290, (n,), generator=g).tolist() for n in (6, 4))
    eng = make_engine(models, overlap=True)
    blocks = Blocks(eng.kv.num_blocks - 1)
    got: dict[int, list] = {1: [], 2: []}
    for call in (lambda: eng.prefill([req(1, pa, 6, blocks)]), lambda: eng.decode({}, 4)):
        for x in call().generations:  # 1 token at prefill + 4: the carried step holds the 6th
            got[x.request_id].append((x.token_id, x.finish_reason))
    assert eng._carried is not None
    for x in eng.prefill([req(2, pb, 3, blocks)]).generations:
        got[x.request_id].append((x.token_id, x.finish_reason))
    assert 1 not in eng.seqs  # read at the prefill: A ended
    while eng.seqs or eng._orphans:
        for x in eng.decode({1: blocks.take(1)} if not got[2][1:] else {}, 4).generations:
            got[x.request_id].append((x.token_id, x.finish_reason))
    assert [t for t, _ in got[1]] == hf_greedy(hf, pa, 6) and got[1][-1][1] is FinishReason.LENGTH
    assert [t for t, _ in got[2]] == hf_greedy(hf, pb, 3)


@pytest.mark.parametrize(
    "tokens, rows",
    [
        (1, [2]),  # too short for the 16-row and mixed batches
        (5, [2, 3, 1]),
        (400, [2, 16, 3, 1, 1, 1]),  # + one sequence of 1, 16 and 128 tokens (1024 > 400)
    ],
)
def test_warmup_kernel_preload_runs_the_serving_batch_shapes(models, tokens, rows):
    # On CUDA, memory._plan_cuda runs this before measuring free memory (the kernels' first launch
    # must not come after the KV cache took its share, nor compile on the request path); the batch
    # logic is device-independent.
    from shard.native.kv_cache import KVCache
    from shard.native.memory import _load_serving_kernels

    eng = make_engine(models)
    blocks = max(16, -(-(tokens + 1) // eng.block_size))  # as _plan_cuda sizes its scratch cache
    scratch = KVCache.allocate(num_layers=len(eng.model.layers), num_blocks=blocks, block_size=eng.block_size,
                               num_kv_heads=eng.model.num_local_kv_heads, head_dim=eng.mc.head_dim,
                               dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    seen = []
    eng.sampler.warm_up = seen.append  # the logits the sampler would load its kernel on
    _load_serving_kernels(eng, scratch, [1 + i % (eng.mc.vocab_size - 1) for i in range(tokens)])
    assert [x.shape for x in seen] == [(r, eng.mc.vocab_size) for r in rows]
    assert all(torch.isfinite(x).all() for x in seen)
