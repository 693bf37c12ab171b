"""TrtllmEngine (shard/trtllm) driven through the Engine protocol against the TEST DOUBLE of
TensorRT-LLM in tests/trtllm_double (put on sys.path by the `trtllm` fixture, removed afterwards).

These tests show the adapter drives the documented Executor API correctly; they do not show it
works with a real TensorRT-LLM, which cannot be installed here.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any

import grpc
import pytest

from shard.config import ShardConfig
from shard.dist import DistContext
from shard.engine.base import EngineConfigError, EngineError, InvalidRequestError, OutOfResourcesError
from shard.engine.registry import create_engine
from shard.engine.types import (
    EngineInfo,
    EngineKind,
    FinishReason,
    Generation,
    NewRequest,
    SamplingParams,
    StoppingParams,
    WarmupResult,
    WarmupSpec,
)
from shard.pb import generate_pb2 as pb
from shard.pb import generate_pb2_grpc
from shard.server import build_server
from shard.trtllm.engine import TrtllmEngine
from shard.trtllm.responses import Track, events_from_result
from shard.trtllm.startup import detect_host, executor_config
from shard.trtllm.validate import parse_engine_config
from tests.trtllm_double.harness import DOUBLE_DIR, FIXTURES, double_on_path, make_engine_dir, wait_until

POLL_S = 0.05
EOS = 128001  # the fixture's generation_config: eos_token_id [128001, 128008, 128009]


@pytest.fixture
def trtllm():
    with double_on_path() as executor:
        import tensorrt_llm

        tensorrt_llm.__version__ = "0.16.0"  # the version that "built" the 0.16 fixture
        yield executor


@pytest.fixture
def engine_dir(tmp_path):
    return make_engine_dir(tmp_path / "engine", "trtllm-build-0.16-llama-tp1")


def build(engine_dir, *, timeout_s: float = 5.0, **config: Any) -> TrtllmEngine:
    cfg = ShardConfig(model_id=str(engine_dir), engine="trtllm", kv_cache_fraction=0.5, **config)
    dist = DistContext.single("cpu")
    return TrtllmEngine.build(
        cfg,
        dist,
        host=detect_host(dist.device),
        poll_s=POLL_S,
        stats_interval_s=0.05,
        first_token_timeout_s=timeout_s,
        stall_timeout_s=timeout_s,
    )


@pytest.fixture
def engine(trtllm, engine_dir):
    eng = build(engine_dir)
    yield eng
    eng.shutdown()


def the_executor(trtllm):
    (executor,) = trtllm.Executor.instances
    return executor


def req(rid: int, prompt: tuple[int, ...], max_new: int, **kw: Any) -> NewRequest:
    sampling = kw.pop("sampling", SamplingParams(seed=rid))
    stopping = StoppingParams(
        max_new_tokens=max_new,
        ignore_eos_token=kw.pop("ignore_eos", False),
        stop_token_ids=kw.pop("stop_ids", ()),
    )
    return NewRequest(id=rid, input_ids=prompt, sampling=sampling, stopping=stopping, **kw)


def run_to_end(
    engine: TrtllmEngine, first: list[Generation], max_steps: int = 4
) -> dict[int, list[Generation]]:
    """Decodes until the running set is empty; every request's generations in arrival order."""
    out: dict[int, list[Generation]] = {}
    for g in first:
        out.setdefault(g.request_id, []).append(g)
    for _ in range(1000):
        result = engine.decode({}, max_steps)
        if result.steps == 0:
            return out
        for g in result.generations:
            out.setdefault(g.request_id, []).append(g)
    raise AssertionError("requests never finished")


def expected(
    rid: int, tokens: list[int], seed: int, finish: FinishReason, start: int = 0
) -> list[Generation]:
    return [
        Generation(
            request_id=rid,
            token_id=t,
            logprob=-(t % 7) / 8,  # the double's logprob rule
            generated_tokens=start + i + 1,
            seed=seed,
            finish_reason=finish if i == len(tokens) - 1 else None,
        )
        for i, t in enumerate(tokens)
    ]


# ---------------------------------------------------------------- start-up and Info


def test_info_reports_engine_limits_and_kv_contract(engine):
    assert engine.info() == EngineInfo(
        model_id=engine.info().model_id,
        dtype="bfloat16",
        device_type="cuda",
        world_size=1,
        tp_size=1,
        pp_size=1,
        engine=EngineKind.TRTLLM,
        block_size=0,
        manages_kv_cache=True,
        vocab_size=128256,
        eos_token_ids=(128001, 128008, 128009),
        max_batch_size=64,
        max_input_tokens=2048,
        max_total_tokens=4096,
        max_batch_prefill_tokens=8192,
        max_beam_width=1,
        supports_prefix_caching=False,
        supports_prefill_logprobs=False,
        max_top_n_tokens=0,
        unsupported_parameters=("typical_p",),
        engine_version="0.16.0",
    )
    assert engine.info().model_id.endswith("engine")
    assert engine.healthy()


def test_executor_config_is_explicit(trtllm, engine_dir):
    eng = build(engine_dir, max_batch_size=16, max_input_tokens=1000)
    try:
        executor = the_executor(trtllm)
        cfg = executor.config
        assert executor.model_path == engine_dir
        assert cfg.max_beam_width == 1
        assert cfg.kv_cache_config.free_gpu_memory_fraction == 0.5
        assert cfg.kv_cache_config.enable_block_reuse is False  # engine built without paged context FMHA
        assert cfg.enable_chunked_context is False
        assert (
            cfg.scheduler_config.capacity_scheduler_policy
            == trtllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
        )
        assert cfg.parallel_config.communication_type == trtllm.CommunicationType.MPI
        assert cfg.parallel_config.communication_mode == trtllm.CommunicationMode.LEADER
        assert cfg.max_batch_size == 16
        assert (eng.info().max_batch_size, eng.info().max_input_tokens) == (16, 1000)
    finally:
        eng.shutdown()
    # An engine built with paged context FMHA gets block reuse and context chunking.
    fp8 = parse_engine_config(FIXTURES / "trtllm-build-1.0-llama-fp8-tp2" / "config.json")
    cfg, reuse = executor_config(trtllm, fp8, kv_cache_fraction=0.8, max_batch_size=0)
    # --scheduler-policy reaches TensorRT-LLM's capacity scheduler; auto keeps its default.
    policy = trtllm.CapacitySchedulerPolicy
    for flag, want in (("auto", policy.GUARANTEED_NO_EVICT), ("max_utilization", policy.MAX_UTILIZATION),
                       ("guaranteed_no_evict", policy.GUARANTEED_NO_EVICT)):  # fmt: skip
        got = executor_config(trtllm, fp8, kv_cache_fraction=0.8, max_batch_size=0, scheduler_policy=flag)[0]
        assert got.scheduler_config.capacity_scheduler_policy == want, flag
    assert (
        reuse is True
        and cfg.kv_cache_config.enable_block_reuse is True
        and cfg.enable_chunked_context is True
    )
    assert cfg.max_batch_size is None


def test_caps_above_the_engine_are_refused_before_loading(trtllm, engine_dir):
    with pytest.raises(EngineConfigError, match="--max-total-tokens 8192 exceeds the engine's limit 4096"):
        build(engine_dir, max_total_tokens=8192)
    assert trtllm.Executor.instances == []


def test_load_failure_is_a_config_error_with_advice(trtllm, engine_dir):
    trtllm.Executor.fail_construction = RuntimeError(
        "The engine plan file is generated on an incompatible device"
    )
    try:
        with pytest.raises(EngineConfigError) as e:
            build(engine_dir)
    finally:
        trtllm.Executor.fail_construction = None
    assert "incompatible device" in str(e.value) and "rebuild the engine on this GPU" in str(e.value)


# ---------------------------------------------------------------- Warmup


def test_warmup_runs_the_longest_prompt_and_reports_the_kv_budget(trtllm, engine):
    result = engine.warmup(
        WarmupSpec(max_input_tokens=100, max_total_tokens=300, max_batch_prefill_tokens=100, max_batch_size=8)
    )
    # The double: int(0.5 * 1000) blocks of the engine's 64 tokens per block.
    assert result == WarmupResult(num_blocks=0, block_size=0, max_supported_total_tokens=500 * 64)
    (warm,) = the_executor(trtllm).requests
    assert len(warm.input_token_ids) == 100 and warm.max_tokens == 2 and warm.end_id == -1
    assert warm.sampling_config.top_k == 1
    assert engine.decode({}, 4).steps == 0  # the warmup request is gone


def test_warmup_refuses_router_limits_beyond_the_engine(engine):
    with pytest.raises(EngineConfigError, match="--max-input-tokens 3000 exceeds the engine's limit 2048"):
        engine.warmup(
            WarmupSpec(
                max_input_tokens=3000, max_total_tokens=4000, max_batch_prefill_tokens=3000, max_batch_size=0
            )
        )


def test_warmup_refuses_a_kv_cache_smaller_than_one_request(trtllm, engine_dir):
    cfg = ShardConfig(model_id=str(engine_dir), engine="trtllm", kv_cache_fraction=0.01)
    dist = DistContext.single("cpu")
    eng = TrtllmEngine.build(cfg, dist, host=detect_host(dist.device), poll_s=POLL_S, first_token_timeout_s=5)
    try:
        with pytest.raises(OutOfResourcesError) as e:  # 10 blocks x 64 tokens < 4096
            eng.warmup(
                WarmupSpec(
                    max_input_tokens=16, max_total_tokens=4096, max_batch_prefill_tokens=16, max_batch_size=0
                )
            )
        assert "holds 640 tokens" in str(e.value) and "--kv-cache-fraction" in str(e.value)
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- request mapping


def test_sampling_parameters_map_onto_sampling_config_exactly(trtllm, engine):
    sampled = SamplingParams(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        do_sample=True,
        seed=1234,
        repetition_penalty=1.1,
        frequency_penalty=0.3,
    )
    greedy = SamplingParams(do_sample=False, seed=99, temperature=0.5)
    plain_sampling = SamplingParams(do_sample=True, seed=7)  # top_k 0 and top_p 1.0 = off
    engine.prefill(
        [
            req(1, (10, 20), 5, sampling=sampled, generated_before=1),
            req(2, (30,), 3, sampling=greedy, stop_ids=(500,)),
            req(3, (40,), 3, sampling=plain_sampling, ignore_eos=True),
        ]
    )
    r1, r2, r3 = the_executor(trtllm).requests

    def fields(sc) -> dict[str, Any]:
        names = (
            "beam_width",
            "top_k",
            "top_p",
            "temperature",
            "seed",
            "repetition_penalty",
            "frequency_penalty",
        )
        extra = ("presence_penalty", "min_tokens", "top_p_min", "length_penalty", "no_repeat_ngram_size")
        return {n: getattr(sc, n) for n in names + extra}

    unset = dict.fromkeys(
        ("presence_penalty", "min_tokens", "top_p_min", "length_penalty", "no_repeat_ngram_size")
    )
    assert fields(r1.sampling_config) == {
        "beam_width": 1,
        "top_k": 40,
        "top_p": 0.9,
        "temperature": 0.7,
        "seed": 1234,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0.3,
        **unset,
    }
    assert fields(r2.sampling_config) == {
        "beam_width": 1,
        "top_k": 1,
        "top_p": None,
        "temperature": None,
        "seed": 99,
        "repetition_penalty": None,
        "frequency_penalty": None,
        **unset,
    }
    assert (r3.sampling_config.top_k, r3.sampling_config.top_p, r3.sampling_config.temperature) == (
        0,
        1.0,
        1.0,
    )
    # Request fields: streaming, new tokens still allowed, EOS ids and stop ids as TensorRT-LLM wants them.
    assert (r1.input_token_ids, r1.max_tokens, r1.streaming) == ([10, 20], 4, True)
    assert (r1.end_id, r1.pad_id, r1.stop_words) == (EOS, EOS, [[128008], [128009]])
    assert r2.stop_words == [[128008], [128009], [500]]
    assert (r3.end_id, r3.stop_words) == (-1, None)  # ignore_eos_token: no end id, no stop words
    assert r1.output_config.return_log_probs is True and r1.output_config.exclude_input_from_output is True


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            req(1, (1,), 4, sampling=SamplingParams(do_sample=True, typical_p=0.5)),
            "typical_p is not supported",
        ),
        (req(1, (1,), 4, top_n_tokens=2), "top_n_tokens is not supported"),
        (req(1, (1,), 4, prefill_logprobs=True), "prompt logprobs"),
        (req(1, tuple(range(2049)), 4), "2049 prompt tokens exceed the engine's limit 2048"),
        (req(1, tuple(range(2000)), 3000), "exceed the engine's max_seq_len 4096"),
        (
            req(1, (1,), 4, sampling=SamplingParams(do_sample=True, temperature=0.0)),
            "temperature must be > 0",
        ),
    ],
)
def test_unsupported_requests_are_refused_before_enqueueing(trtllm, engine, request_, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.prefill([req(7, (5,), 4), request_])
    assert the_executor(trtllm).requests == []  # nothing of the batch reached TensorRT-LLM
    assert engine.decode({}, 1).steps == 0


def test_duplicate_request_id_is_refused(engine):
    engine.prefill([req(1, (5,), 50)])
    with pytest.raises(InvalidRequestError, match="already running"):
        engine.prefill([req(1, (6,), 4)])


# ---------------------------------------------------------------- streaming, finishing, filtering


def test_tokens_stream_in_order_until_length(engine):
    first = engine.prefill([req(1, (10, 20), 5), req(2, (100,), 3, generated_before=1)])
    assert first.steps == 1
    assert [g.token_id for g in first.generations] == [21, 101]  # one first token per request, request order
    got = run_to_end(engine, first.generations, max_steps=2)
    assert got[1] == expected(1, [21, 22, 23, 24, 25], seed=1, finish=FinishReason.LENGTH)
    # generated_before counts toward max_new_tokens and generated_tokens.
    assert got[2] == expected(2, [101, 102], seed=2, finish=FinishReason.LENGTH, start=1)
    assert engine.filter([]) == 0


def test_decode_is_step_major_and_capped_by_max_steps(trtllm, engine):
    first = engine.prefill([req(1, (10,), 50), req(2, (500,), 50)])
    bridge = engine._bridge
    assert bridge.wait(lambda t: all(len(tr.pending) >= 3 for tr in t.values()), 5.0)
    the_executor(trtllm).hold()  # no more tokens: the decode below sees exactly what is pending
    result = engine.decode({}, 3)
    assert result.steps == 3
    assert [(g.request_id, g.token_id) for g in result.generations] == [
        (1, 12),
        (2, 502),
        (1, 13),
        (2, 503),
        (1, 14),
        (2, 504),
    ]
    assert [g.token_id for g in first.generations] == [11, 501]


def test_eos_and_stop_tokens_finish_with_eos(engine):
    first = engine.prefill(
        [
            req(1, (127999,), 10),  # 128000, then 128001 = end_id
            req(2, (128007,), 10),  # 128008: another EOS id of the model (a stop word)
            req(3, (498,), 10, stop_ids=(500,)),  # a request stop id
            req(4, (127999,), 4, ignore_eos=True),  # EOS ignored: runs to max_new_tokens
        ]
    )
    got = run_to_end(engine, first.generations)
    assert got[1] == expected(1, [128000, EOS], seed=1, finish=FinishReason.EOS_TOKEN)
    assert got[2] == expected(2, [128008], seed=2, finish=FinishReason.EOS_TOKEN)
    assert got[3] == expected(3, [499, 500], seed=3, finish=FinishReason.EOS_TOKEN)
    assert got[4] == expected(4, [128000, 128001, 128002, 128003], seed=4, finish=FinishReason.LENGTH)


def test_final_response_without_the_end_token_reports_eos(trtllm, engine):
    trtllm.Executor.end_token_in_output = False  # TensorRT-LLM may end on end_id without returning it
    try:
        got = run_to_end(engine, engine.prefill([req(1, (127999,), 10)]).generations)
    finally:
        trtllm.Executor.end_token_in_output = True
    assert [(g.token_id, g.finish_reason, g.generated_tokens) for g in got[1]] == [
        (128000, None, 1),
        (EOS, FinishReason.EOS_TOKEN, 2),
    ]
    assert math.isnan(got[1][1].logprob)


def test_filter_cancels_router_ended_requests(trtllm, engine):
    engine.prefill([req(1, (10,), 1000), req(2, (20,), 1000), req(3, (30,), 1000)])
    executor = the_executor(trtllm)
    assert engine.filter([2, 12345]) == 2  # unknown ids are ignored
    assert executor.cancelled == [2]  # TensorRT-LLM ids are 1, 2, 3 in enqueue order
    for _ in range(5):
        assert {g.request_id for g in engine.decode({}, 4).generations} <= {1, 3}
    engine.clear()
    assert sorted(executor.cancelled) == [1, 2, 3]
    assert engine.filter([]) == 0 and engine.decode({}, 4).steps == 0


def test_finished_requests_are_not_cancelled(trtllm, engine):
    run_to_end(engine, engine.prefill([req(1, (10,), 2)]).generations)
    assert engine.filter([1]) == 0
    assert the_executor(trtllm).cancelled == []


# ---------------------------------------------------------------- no spinning, deadlines, failures


def test_idle_engine_does_not_spin(trtllm, engine):
    executor = the_executor(trtllm)
    calls, cpu = executor.await_calls, time.process_time()
    time.sleep(1.0)  # measuring an idle second, not synchronizing
    idle_calls, idle_cpu = executor.await_calls - calls, time.process_time() - cpu
    # One await_responses per poll interval (blocking in between), nothing more.
    assert 1 <= idle_calls <= 1 / POLL_S + 2
    assert idle_cpu < 0.25


def test_decode_waits_for_tokens_without_spinning_and_gives_up_at_the_deadline(trtllm, engine_dir):
    eng = build(engine_dir, timeout_s=1.0)
    try:
        eng.prefill([req(1, (10,), 1000)])
        executor = the_executor(trtllm)
        executor.hold()  # TensorRT-LLM stalls: no new token from now on
        with pytest.raises(EngineError, match="produced no token in 1 s"):
            for _ in range(100):  # the first calls return tokens that arrived before the stall
                calls, cpu, started = executor.await_calls, time.process_time(), time.monotonic()
                eng.decode({}, 1000)
        assert 0.9 <= time.monotonic() - started < 3.0
        assert executor.await_calls - calls <= 1.0 / POLL_S + 3
        assert time.process_time() - cpu < 0.3
        executor.release()
        assert eng.decode({}, 1).steps == 1  # still usable once tokens flow again
    finally:
        eng.shutdown()


def test_prefill_gives_up_without_a_first_token_and_cancels(trtllm, engine_dir):
    eng = build(engine_dir, timeout_s=0.5)
    try:
        executor = the_executor(trtllm)
        executor.hold()
        with pytest.raises(EngineError, match="no first token within"):
            eng.prefill([req(1, (10,), 10)])
        assert executor.cancelled == [1]
        assert eng.filter([]) == 0 and eng.healthy()
    finally:
        eng.shutdown()


def test_error_response_fails_the_batch_and_cancels_the_rest(trtllm, engine):
    executor = the_executor(trtllm)
    executor.fail_next_request = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(EngineError, match="TensorRT-LLM failed request 1: CUDA error"):
        engine.prefill([req(1, (10,), 10), req(2, (20,), 10)])
    assert executor.cancelled == [2]  # request 1 already ended in TensorRT-LLM
    assert engine.filter([]) == 0 and engine.healthy()


def test_an_await_that_returns_at_once_does_not_spin(trtllm, engine):
    executor = the_executor(trtllm)
    calls = []
    executor.await_responses = lambda timeout=None: calls.append(timeout) or []
    time.sleep(0.5)  # measuring, not synchronizing
    assert 1 <= len(calls) <= 0.5 / POLL_S + 2


def test_an_executor_that_cannot_enqueue_is_unhealthy(trtllm, engine):
    assert engine.healthy()
    the_executor(trtllm).shutdown()  # TensorRT-LLM stopped underneath the adapter
    assert not engine.healthy()


def test_response_thread_failure_makes_the_engine_unhealthy(trtllm, engine):
    the_executor(trtllm).fail_await = RuntimeError("executor died")
    assert wait_until(lambda: not engine.healthy())
    with pytest.raises(EngineError, match="executor died"):
        engine.prefill([req(1, (10,), 10)])


def test_iteration_stats_are_exposed(engine):
    run_to_end(engine, engine.prefill([req(1, (10,), 20)]).generations)
    assert wait_until(lambda: engine.iteration_stats() is not None)
    stats = engine.iteration_stats()
    assert stats["kvCacheStats"]["maxNumBlocks"] == 500 and stats["kvCacheStats"]["tokensPerBlock"] == 64
    assert stats["iter"] >= 1 and "numActiveRequests" in stats


def test_shutdown_joins_the_response_thread(trtllm, engine_dir):
    eng = build(engine_dir)
    executor = the_executor(trtllm)
    eng.prefill([req(1, (10,), 1000)])
    thread = eng._bridge._thread
    assert thread.is_alive()
    eng.shutdown()
    assert not thread.is_alive()
    assert executor.shutdown_calls == 1 and not executor.is_running_thread()
    assert not eng.healthy()
    eng.shutdown()  # idempotent
    assert executor.shutdown_calls == 1
    with pytest.raises(EngineError, match="shut down"):
        eng.prefill([req(2, (10,), 4)])


# ---------------------------------------------------------------- leader mode across ranks


def _two_rank_dir(tmp_path):
    return make_engine_dir(tmp_path / "tp2", "trtllm-build-1.0-llama-fp8-tp2")


def _build_rank(engine_dir, rank: int, *, allgather, abort=None) -> TrtllmEngine:
    cfg = ShardConfig(model_id=str(engine_dir), engine="trtllm")
    dist = replace(DistContext.single("cpu"), rank=rank, world_size=2, tp_rank=rank, tp_size=2)
    return TrtllmEngine.build(
        cfg, dist, host=detect_host(dist.device), allgather=allgather, abort=abort, poll_s=POLL_S
    )


def test_non_leader_rank_answers_without_enqueueing(trtllm, tmp_path, monkeypatch):
    import tensorrt_llm

    tensorrt_llm.__version__ = "1.0.0"
    monkeypatch.setenv("PMI_RANK", "1")
    gathered = []
    eng = _build_rank(_two_rank_dir(tmp_path), 1, allgather=lambda v: gathered.append(v) or [None, None])
    try:
        executor = the_executor(trtllm)
        assert gathered == [None]  # this rank's verdict was shared
        assert not executor.is_running_thread() and not executor.can_enqueue_requests()
        info = eng.info()
        assert (info.world_size, info.tp_size, info.max_input_tokens, info.max_total_tokens) == (
            2,
            2,
            8192,
            16384,
        )
        assert eng.prefill([req(1, (10,), 5)]).generations == []
        assert eng.decode({}, 4).steps == 0 and eng.filter([1]) == 0
        warm = eng.warmup(
            WarmupSpec(
                max_input_tokens=100, max_total_tokens=200, max_batch_prefill_tokens=100, max_batch_size=0
            )
        )
        assert warm.max_supported_total_tokens == 128 * 16384
        assert executor.requests == [] and eng.healthy()
    finally:
        eng.shutdown()
    assert executor.shutdown_calls == 1


def test_a_refusal_on_another_rank_stops_this_rank_before_loading(trtllm, tmp_path):
    import tensorrt_llm

    tensorrt_llm.__version__ = "1.0.0"
    with pytest.raises(EngineConfigError) as e:
        _build_rank(_two_rank_dir(tmp_path), 0, allgather=lambda v: [v, "missing rank1.engine"])
    assert str(e.value) == "rank 1: missing rank1.engine"
    assert trtllm.Executor.instances == []


class _Aborted(Exception):
    pass


def test_load_failure_on_a_multi_rank_world_aborts_it(trtllm, tmp_path):
    import tensorrt_llm

    tensorrt_llm.__version__ = "1.0.0"
    aborted: list[str] = []

    def abort(message: str):
        aborted.append(message)
        raise _Aborted

    trtllm.Executor.fail_construction = RuntimeError("out of memory")
    try:
        with pytest.raises(_Aborted):
            _build_rank(_two_rank_dir(tmp_path), 0, allgather=lambda v: [v, v], abort=abort)
    finally:
        trtllm.Executor.fail_construction = None
    assert len(aborted) == 1 and "out of memory" in aborted[0]


# ---------------------------------------------------------------- response decoding (unit)


class _Result:
    def __init__(self, tokens, *, log_probs=None, final=False, reasons=None):
        self.output_token_ids = [tokens]
        self.log_probs = log_probs
        self.is_final = final
        self.finish_reasons = reasons or []


class _Reason:
    def __init__(self, name):
        self.name = name


def test_events_from_results():
    track = Track(request_id=1, end_id=2, eos_id=2, stop_ids=frozenset({9}), max_tokens=3)
    # Cumulative logprobs (some versions) and per-response ones both give the new tokens' logprobs.
    events = events_from_result(track, _Result([5], log_probs=[[-0.5]]))
    events += events_from_result(track, _Result([6], log_probs=[[-0.5, -0.25]]))
    assert [(e.token_id, e.logprob, e.finish) for e in events] == [(5, -0.5, None), (6, -0.25, None)]
    # max_tokens reached: LENGTH on that token even before is_final arrives; later responses ignored.
    (last,) = events_from_result(track, _Result([7], log_probs=None))
    assert (last.token_id, last.finish) == (7, FinishReason.LENGTH) and math.isnan(last.logprob)
    assert events_from_result(track, _Result([], final=True, reasons=[_Reason("LENGTH")])) == []
    # A final response that stops on an unexpected reason marks its last token.
    other = Track(request_id=2, end_id=-1, eos_id=2, stop_ids=frozenset(), max_tokens=10)
    (e,) = events_from_result(other, _Result([4], final=True, reasons=[_Reason("FinishReason.STOP_WORDS")]))
    assert (e.token_id, e.finish) == (4, FinishReason.EOS_TOKEN)


# ---------------------------------------------------------------- through the shard's gRPC server


def test_grpc_round_trip_through_the_registry_and_server(trtllm, engine_dir):
    """`--engine trtllm` from the registry, served by shard.server over a unix socket."""
    engine = create_engine(
        ShardConfig(model_id=str(engine_dir), engine="trtllm", kv_cache_fraction=0.5),
        DistContext.single("cpu"),
    )
    assert isinstance(engine, TrtllmEngine)
    socket_dir = tempfile.mkdtemp(prefix="trt-", dir="/tmp")  # unix socket paths are short
    url = f"unix://{socket_dir}/shard-0"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = build_server(engine, [url], [url])
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        stub = generate_pb2_grpc.TextGenerationServiceStub(grpc.insecure_channel(url))
        info = stub.Info(pb.InfoRequest(), timeout=10)
        assert (info.engine, info.manages_kv_cache, info.block_size) == (pb.ENGINE_KIND_TRTLLM, True, 0)
        assert (info.max_input_tokens, info.max_total_tokens, info.max_top_n_tokens) == (2048, 4096, 0)
        warm = stub.Warmup(pb.WarmupRequest(max_input_tokens=64, max_total_tokens=128), timeout=30)
        assert (warm.num_blocks, warm.max_supported_total_tokens) == (0, 500 * 64)
        sampling = pb.SamplingParameters(
            temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, seed=5
        )
        request = pb.Request(
            id=9, input_ids=[10], sampling=sampling, stopping=pb.StoppingParameters(max_new_tokens=3)
        )
        (first,) = stub.Prefill(pb.PrefillRequest(requests=[request]), timeout=30).generations
        tokens = [(first.token_id, first.finish_reason, first.generated_tokens, first.seed)]
        while tokens[-1][1] == pb.FINISH_REASON_UNSPECIFIED:
            c = stub.Decode(pb.DecodeRequest(max_steps=4), timeout=30).tokens
            tokens += zip(c.token_ids, c.finish_reasons, c.generated_tokens, c.seeds, strict=True)
        assert tokens == [
            (11, pb.FINISH_REASON_UNSPECIFIED, 1, 5),
            (12, pb.FINISH_REASON_UNSPECIFIED, 2, 5),
            (13, pb.FINISH_REASON_LENGTH, 3, 5),
        ]
        bad = pb.SamplingParameters(temperature=1.0, top_p=1.0, typical_p=0.5, do_sample=True, seed=1)
        with pytest.raises(grpc.RpcError) as e:
            stub.Prefill(
                pb.PrefillRequest(
                    requests=[pb.Request(id=10, input_ids=[1], sampling=bad, stopping=request.stopping)]
                ),
                timeout=30,
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "typical_p" in e.value.details()
        assert stub.FilterBatch(pb.FilterBatchRequest(remove_ids=[9]), timeout=10).running == 0
        stub.Health(pb.HealthRequest(), timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0, shutdown_engine=True), loop).result(timeout=20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert the_executor(trtllm).shutdown_calls == 1 and not engine.healthy()


def test_two_shard_processes_refuse_together_over_mpi(tmp_path):
    """Real `mpiexec -n 2 python -m shard --engine trtllm` with the double: rank 1's engine file is
    missing; both ranks agree over MPI and exit with the configuration status and the same message."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.access(mpiexec, os.X_OK):
        pytest.skip("no mpiexec next to this Python (the mpich wheel)")
    engine_dir = make_engine_dir(tmp_path / "tp2", "trtllm-build-1.0-llama-fp8-tp2", ranks=[0])
    repo = str(FIXTURES.parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DOUBLE_DIR), repo])}
    socket_prefix = tempfile.mkdtemp(prefix="trt-", dir="/tmp") + "/s"
    out = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-m", "shard", "--engine", "trtllm"]
        + ["--model-id", str(engine_dir), "--uds-path", socket_prefix, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=repo,
    )
    shutil.rmtree(os.path.dirname(socket_prefix), ignore_errors=True)
    assert out.returncode == 2, out.stdout + out.stderr
    expected_line = "cannot start: rank 0,1: " + str(engine_dir) + ": missing rank1.engine"
    for rank in (0, 1):
        assert any(
            line.startswith(f"[shard {rank}]") and expected_line in line for line in out.stderr.splitlines()
        ), out.stderr
