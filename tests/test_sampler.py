"""The native sampler against Hugging Face transformers' logits processors, plus its RNG contract."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from shard.engine.base import InvalidRequestError
from shard.engine.types import SamplingParams
from shard.native.sampler import SampleOutput, Sampler
from shard.native.sampling_batch import SamplingBatch, SamplingRow, make_generator

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
V = 64


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def make_row(
    device: torch.device,
    *,
    history: list[int] | None = None,
    top_n: int = 0,
    **params: float | int | bool,
) -> SamplingRow:
    p = SamplingParams(**params)  # type: ignore[arg-type]
    generator = make_generator(p.seed, device) if p.do_sample else None
    return SamplingRow(params=p, history=history or [], generator=generator, top_n=top_n)


def sample(rows: list[SamplingRow], logits: torch.Tensor, device: torch.device) -> SampleOutput:
    batch = SamplingBatch.prepare(rows, vocab_size=logits.shape[1], device=device)
    return Sampler(logits.shape[1], device)(logits.to(device), batch)


def hf_penalized(
    logits: torch.Tensor, history: list[int], repetition: float, frequency: float
) -> torch.Tensor:
    """(V,) -> (V,): transformers' repetition penalty, then TGI/OpenAI's frequency penalty by hand."""
    scores = logits[None].clone()
    if repetition != 1.0 and history:
        scores = RepetitionPenaltyLogitsProcessor(penalty=repetition)(torch.tensor([history]), scores)
    counts = torch.bincount(torch.tensor(history, dtype=torch.int64), minlength=logits.shape[0])
    return scores[0] - frequency * counts.float()


def hf_warped(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(V,) -> (V,): transformers' warpers in TGI's order, each only when on."""
    scores = logits[None].clone()
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(None, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    if p.typical_p < 1.0:
        scores = TypicalLogitsWarper(p.typical_p)(None, scores)
    return scores[0]


def test_greedy_is_argmax_and_ignores_sampling_knobs(device: torch.device) -> None:
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0)) * 3
    # Greedy rows ignore temperature/top-k/top-p: logprobs use temperature 1.
    rows = [make_row(device, top_n=3, temperature=0.3, top_k=2, top_p=0.5) for _ in range(5)]
    batch = SamplingBatch.prepare(rows, vocab_size=V, device=device)
    assert batch.counts is None and batch.temperature is None and batch.sampled_generators == ()
    out = Sampler(V, device)(logits.to(device), batch)
    expected_lp = logits.log_softmax(-1)
    assert out.token_ids.cpu().tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(
        out.logprobs.cpu(), expected_lp.gather(1, logits.argmax(-1)[:, None])[:, 0], atol=1e-5
    )
    top = expected_lp.topk(3, -1)
    assert out.top_ids.cpu().tolist() == top.indices.tolist()
    assert torch.allclose(out.top_logprobs.cpu(), top.values, atol=1e-5)


def test_repetition_penalty_matches_transformers(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=gen) * 4
    logits[1] -= 6  # mostly negative logits: the penalty multiplies instead of dividing
    penalties = [1.3, 0.7, 2.0, 1.0]
    # Each history holds its row's argmax (and repeats), so the penalty can move the choice.
    histories = [
        [int(logits[i].argmax())] * 2 + torch.randint(0, V, (9,), generator=gen).tolist() for i in range(4)
    ]
    rows = [
        make_row(device, history=h, repetition_penalty=p) for h, p in zip(histories, penalties, strict=True)
    ]
    out = sample(rows, logits, device)
    expected = torch.stack([hf_penalized(logits[i], histories[i], penalties[i], 0.0) for i in range(4)])
    assert out.token_ids.cpu().tolist() == expected.argmax(-1).tolist()
    assert out.token_ids.cpu().tolist() != logits.argmax(-1).tolist()  # the penalty did something
    scaled, filtered = Sampler(V, device).process(
        logits.to(device), SamplingBatch.prepare(rows, vocab_size=V, device=device)
    )
    assert filtered is None
    assert torch.equal(scaled.cpu(), expected)


def test_frequency_penalty_hand_computed(device: torch.device) -> None:
    logits = torch.zeros(2, 8)
    logits[:, 3] = 1.0
    # Row 0: token 3 seen 3 times -> 1 - 0.5*3 = -0.5; token 5 seen once -> -0.5; others 0: argmax 0.
    # Row 1: no penalty, same history: stays 3.
    history = [3, 3, 5, 3]
    rows = [
        make_row(device, history=history, frequency_penalty=0.5, top_n=2),
        make_row(device, history=history, top_n=2),
    ]
    batch = SamplingBatch.prepare(rows, vocab_size=8, device=device)
    assert batch.counts is not None and batch.counts.shape == (1, 8)  # only the penalized row pays
    scaled, _ = Sampler(8, device).process(logits.to(device), batch)
    assert scaled.cpu().tolist() == [[0, 0, 0, -0.5, 0, -0.5, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]]
    out = Sampler(8, device)(logits.to(device), batch)
    assert out.token_ids.cpu().tolist() == [0, 3]


def test_repetition_then_frequency_order(device: torch.device) -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2)) * 2
    history = [1, 1, 2, 7, 7, 7, 40]
    rows = [make_row(device, history=history, repetition_penalty=1.5, frequency_penalty=0.3)]
    scaled, _ = Sampler(V, device).process(
        logits.to(device), SamplingBatch.prepare(rows, vocab_size=V, device=device)
    )
    assert torch.allclose(scaled.cpu()[0], hf_penalized(logits[0], history, 1.5, 0.3), atol=1e-6)


# (temperature, top_k, top_p, typical_p): every filter alone and together, plus neutral rows.
WARP_CASES = [
    (1.0, 0, 1.0, 1.0),
    (0.7, 0, 1.0, 1.0),
    (1.0, 5, 1.0, 1.0),
    (1.0, 1, 1.0, 1.0),
    (1.3, 0, 0.8, 1.0),
    (1.0, 0, 0.3, 1.0),
    (1.0, 0, 0.0, 1.0),
    (1.0, 0, 1.0, 0.5),
    (0.5, 0, 1.0, 0.9),
    (1.0, 20, 0.9, 1.0),
    (2.0, 30, 0.95, 0.8),
    (1.0, 0, 0.6, 0.4),
    (1.0, 500, 1.0, 1.0),  # k above the vocabulary keeps everything
]


def test_filtered_set_matches_transformers_warpers(device: torch.device) -> None:
    logits = torch.randn(2 * len(WARP_CASES), V, generator=torch.Generator().manual_seed(3))
    rows, cases = [], []
    for i, (t, k, p, m) in enumerate(WARP_CASES):
        params = {"temperature": t, "top_k": k, "top_p": p, "typical_p": m, "do_sample": True, "seed": i}
        rows.append(make_row(device, **params))
        rows.append(make_row(device, temperature=0.5, top_k=1))  # greedy rows interleaved
        cases.append(SamplingParams(**params))
    batch = SamplingBatch.prepare(rows, vocab_size=V, device=device)
    _, filtered = Sampler(V, device).process(logits.to(device), batch)
    assert filtered is not None and filtered.shape == (len(WARP_CASES), V)
    kept_sizes = []
    for j, p in enumerate(cases):
        expected = hf_warped(logits[2 * j], p)
        got = filtered[j].cpu()
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), p
        finite = torch.isfinite(expected)
        assert torch.allclose(got[finite], expected[finite], atol=1e-5), p
        kept_sizes.append(int(finite.sum()))
    assert kept_sizes[0] == V and kept_sizes[3] == 1 and kept_sizes[6] == 1
    assert len(set(kept_sizes)) >= 9  # the filters really cut, at different places


def test_filters_on_tied_bf16_logits_match_transformers(device: torch.device) -> None:
    """bf16 logits tie often; top-k and typical-p cut by value, top-p by position as HF does."""
    logits = (torch.randn(4, 2048, generator=torch.Generator().manual_seed(11)) * 3).bfloat16().float()
    cases = [(1.0, 42, 1.0, 1.0), (1.0, 0, 0.9, 1.0), (1.0, 0, 1.0, 0.8), (1.0, 0, 0.95, 0.9)]
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p, typical_p=m, do_sample=True) for t, k, p, m in cases
    ]
    rows = [SamplingRow(params=p, history=[], generator=make_generator(0, device)) for p in params]
    batch = SamplingBatch.prepare(rows, vocab_size=2048, device=device)
    _, filtered = Sampler(2048, device).process(logits.to(device), batch)
    assert filtered is not None
    for j, p in enumerate(params):
        got, expected = torch.isfinite(filtered[j].cpu()), torch.isfinite(hf_warped(logits[j], p))
        if p.top_p < 1.0:  # which of two tied tokens HF keeps depends on the sort's order
            assert int(got.sum()) == int(expected.sum()), p
        else:
            assert torch.equal(got, expected), p
    assert int(torch.isfinite(filtered[0]).sum()) > 42  # the 42nd and 43rd logits tie: both stay, as in HF


def test_draws_stay_inside_the_filtered_set(device: torch.device) -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(4)) * 2
    for t, k, p, m in [(1.0, 4, 1.0, 1.0), (1.0, 0, 0.6, 1.0), (1.0, 0, 1.0, 0.4), (0.8, 10, 0.9, 0.9)]:
        params = {"temperature": t, "top_k": k, "top_p": p, "typical_p": m, "do_sample": True}
        allowed = set(torch.isfinite(hf_warped(logits, SamplingParams(**params))).nonzero()[:, 0].tolist())
        rows = [make_row(device, seed=s, **params) for s in range(300)]
        out = sample(rows, logits.expand(300, V).contiguous(), device)
        drawn = set(out.token_ids.cpu().tolist())
        assert drawn <= allowed and len(drawn) >= min(2, len(allowed)), (params, drawn, allowed)


def test_draws_follow_the_tempered_distribution(device: torch.device) -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 8000
    for temperature in (1.0, 2.0):
        rows = [make_row(device, seed=s, do_sample=True, temperature=temperature) for s in range(n)]
        out = sample(rows, probs.log().expand(n, 4).contiguous(), device)
        freq = torch.bincount(out.token_ids.cpu(), minlength=4).float() / n
        target = probs ** (1 / temperature)
        target /= target.sum()
        assert torch.allclose(freq, target, atol=0.025), (temperature, freq, target)  # ~5 sigma


def draw_sequence(device: torch.device, seed: int, *, neighbours: bool, steps: int = 20) -> list[int]:
    """One sampled request's 20 tokens, alone or between other rows, reusing the batch across steps."""
    step_logits = torch.randn(steps, V, generator=torch.Generator().manual_seed(5)) * 0.5
    me = make_row(device, seed=seed, do_sample=True, temperature=1.5, top_k=40, top_n=2)
    rows = [me]
    if neighbours:
        rows = [
            make_row(device, history=[1, 2, 2], repetition_penalty=1.2),
            make_row(device, seed=seed, do_sample=True, top_p=0.9),  # same seed, own generator
            me,
            make_row(device, seed=99, do_sample=True, history=[3], frequency_penalty=0.4, top_n=5),
        ]
    mine = rows.index(me)
    batch = SamplingBatch.prepare(rows, vocab_size=V, device=device)
    sampler = Sampler(V, device)
    tokens = []
    for s in range(steps):
        logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(100 + s))
        logits[mine] = step_logits[s]
        out = sampler(logits.to(device), batch)
        batch.update_history(out.token_ids)
        tokens.append(out.to_host()[mine].token_id)
    return tokens


def test_seeded_draws_are_reproducible_and_batch_independent(device: torch.device) -> None:
    alone = draw_sequence(device, 1234, neighbours=False)
    assert draw_sequence(device, 1234, neighbours=False) == alone
    assert draw_sequence(device, 1234, neighbours=True) == alone
    assert draw_sequence(device, 4321, neighbours=False) != alone
    assert len(set(alone)) > 5


def test_logprobs_and_top_n_are_consistent(device: torch.device) -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6)) * 2
    history = [4, 4, 9]
    rows = [
        make_row(device, seed=7, do_sample=True, temperature=0.6, top_k=5, top_n=4),
        make_row(device, history=history, repetition_penalty=1.4, top_n=1),
        make_row(device, seed=8, do_sample=True, temperature=1.7, top_p=0.7),
    ]
    out = sample(rows, logits, device)
    base = torch.stack(
        [logits[0] / 0.6, hf_penalized(logits[1], history, 1.4, 0.0), logits[2] / 1.7]
    ).log_softmax(-1)
    ids = out.token_ids.cpu()
    assert torch.allclose(out.logprobs.cpu(), base.gather(1, ids[:, None])[:, 0], atol=1e-5)
    assert out.top_ids.shape == (3, 4)
    top_lp = out.top_logprobs.cpu()
    assert torch.allclose(top_lp, base.gather(1, out.top_ids.cpu()), atol=1e-5)
    assert bool((top_lp[:, :-1] >= top_lp[:, 1:]).all())
    assert out.top_ids.cpu()[:, 0].tolist() == base.argmax(-1).tolist()
    host = out.to_host()
    assert [len(r.top_ids) for r in host] == [4, 1, 0]
    assert [r.token_id for r in host] == ids.tolist()
    assert host[0].top_ids == tuple(out.top_ids[0].cpu().tolist())
    assert host[1].logprob == float(out.logprobs[1])  # float32 survives the packing exactly


def test_mixed_batch_equals_rows_alone(device: torch.device) -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(7)) * 2
    hist = torch.randint(0, V, (6, 12), generator=torch.Generator().manual_seed(8)).tolist()
    specs = [
        {"top_n": 2},
        {"history": hist[1], "repetition_penalty": 1.8},
        {
            "history": hist[2],
            "frequency_penalty": 0.7,
            "do_sample": True,
            "seed": 3,
            "top_p": 0.8,
            "top_n": 5,
        },
        {"do_sample": True, "seed": 4, "top_k": 3, "temperature": 0.9},
        {"history": hist[4], "repetition_penalty": 0.8, "frequency_penalty": 0.2, "top_n": 1},
        {"do_sample": True, "seed": 5, "typical_p": 0.7, "history": hist[5], "repetition_penalty": 1.1},
    ]
    out = sample([make_row(device, **s) for s in specs], logits, device)
    assert out.top_ids.shape == (6, 5)
    for i, spec in enumerate(specs):
        alone = sample([make_row(device, **spec)], logits[i : i + 1], device)
        assert int(out.token_ids[i]) == int(alone.token_ids[0]), spec
        assert torch.allclose(out.logprobs[i].cpu(), alone.logprobs[0].cpu(), atol=1e-6)
        assert out.to_host()[i].top_ids == alone.to_host()[0].top_ids
    for i in (1, 4):  # greedy rows: argmax of transformers' penalized logits
        p = SamplingParams(**{k: v for k, v in specs[i].items() if k not in ("history", "top_n")})
        expected = hf_penalized(logits[i], specs[i]["history"], p.repetition_penalty, p.frequency_penalty)
        assert int(out.token_ids[i]) == int(expected.argmax())


def test_batch_reuse_matches_a_fresh_batch(device: torch.device) -> None:
    """update_history / select / concat give what prepare gives from the full histories."""
    gen = torch.Generator().manual_seed(9)
    hist = torch.randint(0, V, (4, 10), generator=gen).tolist()
    specs = [
        {"repetition_penalty": 1.5},
        {"do_sample": True, "seed": 1, "top_k": 7},
        {"frequency_penalty": 0.5, "do_sample": True, "seed": 2},
        {"repetition_penalty": 0.9, "frequency_penalty": 0.1},
    ]
    sampler = Sampler(V, device)
    batch = SamplingBatch.prepare(
        [make_row(device, history=h, **s) for h, s in zip(hist, specs, strict=True)],
        vocab_size=V,
        device=device,
    )
    logits = torch.randn(4, V, generator=gen).to(device)
    new = torch.tensor([5, 6, 5, 63], device=device)
    batch.update_history(new)
    hist = [h + [int(t)] for h, t in zip(hist, new.tolist(), strict=True)]

    def fresh(idx: list[int]) -> SamplingBatch:
        rows = [make_row(device, history=hist[i], **specs[i]) for i in idx]
        return SamplingBatch.prepare(rows, vocab_size=V, device=device)

    def same(a: SamplingBatch, b: SamplingBatch, rows: list[int]) -> bool:
        return torch.equal(sampler.process(logits[rows], a)[0], sampler.process(logits[rows], b)[0])

    assert same(batch, fresh([0, 1, 2, 3]), [0, 1, 2, 3])
    assert not same(
        batch,
        SamplingBatch.prepare(
            [make_row(device, history=h[:-1], **s) for h, s in zip(hist, specs, strict=True)],
            vocab_size=V,
            device=device,
        ),
        [0, 1, 2, 3],
    )
    assert same(batch.select([3, 1, 0]), fresh([3, 1, 0]), [3, 1, 0])
    assert batch.select([1]).counts is None
    joined = SamplingBatch.concat([batch.select([2]), batch.select([1]), batch.select([0, 3])])
    assert same(joined, fresh([2, 1, 0, 3]), [2, 1, 0, 3])
    # Tensor histories (e.g. kept on the device by the engine) count the same as lists.
    as_tensors = [make_row(device, history=hist[i], **specs[i]) for i in range(4)]
    for r in as_tensors:
        r.history = torch.tensor(r.history, device=device)
    assert same(
        SamplingBatch.prepare(as_tensors, vocab_size=V, device=device), fresh([0, 1, 2, 3]), [0, 1, 2, 3]
    )


def test_sampler_does_not_write_the_logits(device: torch.device) -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(10)).to(device)
    before = logits.clone()
    rows = [
        make_row(device, history=[1, 2], repetition_penalty=1.3, frequency_penalty=0.2),
        make_row(device, seed=1, do_sample=True, temperature=0.5, top_p=0.5, typical_p=0.5, top_k=9),
    ]
    sample(rows, logits, device)
    assert torch.equal(logits, before)


def test_full_range_seed_and_invalid_params(device: torch.device) -> None:
    g = make_generator(2**64 - 1, device)
    assert torch.empty(4, device=device).exponential_(generator=g).isfinite().all()
    bad = [
        {"do_sample": True, "temperature": 0.0},
        {"do_sample": True, "top_p": 1.5},
        {"do_sample": True, "typical_p": 0.0},
        {"do_sample": True, "top_k": -1},
        {"repetition_penalty": 0.0},
    ]
    for spec in bad:
        with pytest.raises(InvalidRequestError):
            SamplingBatch.prepare([make_row(device, **spec)], vocab_size=V, device=device)
    with pytest.raises(InvalidRequestError):
        SamplingBatch.prepare([make_row(device, top_n=-1)], vocab_size=V, device=device)
    with pytest.raises(InvalidRequestError, match="outside"):
        SamplingBatch.prepare(
            [make_row(device, history=[V], repetition_penalty=1.2)], vocab_size=V, device=device
        )


def test_top_n_above_the_vocabulary_returns_the_whole_vocabulary(device: torch.device) -> None:
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(12))
    out = sample([make_row(device, top_n=10), make_row(device, top_n=3)], logits, device)
    host = out.to_host()
    assert out.top_ids.shape == (2, 8)
    assert sorted(host[0].top_ids) == list(range(8)) and len(host[1].top_ids) == 3
    assert host[0].top_logprobs[0] == host[0].logprob  # greedy: the best alternative is the choice
