"""The benchmark suite's own arithmetic: percentiles, TTFT/TPOT/ITL from timestamps, the
bandwidth ceiling from a config, prompt building to an exact token count, SSE parsing, and one
short engine benchmark against a real shard (llama-tiny, dummy weights, CPU)."""

from __future__ import annotations

import asyncio
import json
import math
import random
from types import SimpleNamespace

import pytest

from bench.bandwidth import bytes_per_token, decode_ceiling, load_hf_config
from bench.common import RequestRecord, aggregate, card_name, percentile, summarize
from bench.serve_bench import exact_prompt, num_prompts_for, plan, stream_one


def test_percentile_interpolates_linearly():
    v = [4.0, 1.0, 3.0, 2.0]
    assert percentile(v, 0) == 1.0
    assert percentile(v, 100) == 4.0
    assert percentile(v, 50) == 2.5
    assert percentile(v, 99) == pytest.approx(3.97)  # 3 + (4 - 3) * (0.99 * 3 - 2)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(v, 101)


def test_summarize_scales_and_counts():
    s = summarize([0.001, 0.002, 0.003], scale=1e3)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(2.0)
    assert s["p50"] == pytest.approx(2.0)
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(3.0)
    assert summarize([])["n"] == 0 and math.isnan(summarize([])["p50"])


def test_request_record_ttft_itl_tpot():
    r = RequestRecord(
        start=10.0, input_tokens=5, chunk_times=[10.5, 10.6, 10.8, 11.1], end=11.2, output_tokens=4
    )
    assert r.ok
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.2)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert r.tpot == pytest.approx((1.2 - 0.5) / 3)
    one = RequestRecord(start=0.0, input_tokens=1, chunk_times=[0.2], end=0.3, output_tokens=1)
    assert one.tpot is None and one.itls == []
    assert not RequestRecord(start=0.0, input_tokens=1, error="HTTP 500").ok


def test_aggregate_counts_only_completed_requests():
    a = RequestRecord(start=0.0, input_tokens=10, chunk_times=[1.0, 2.0, 3.0], end=3.0, output_tokens=3)
    b = RequestRecord(start=1.0, input_tokens=10, chunk_times=[1.5, 2.0], end=2.0, output_tokens=2)
    failed = RequestRecord(start=0.0, input_tokens=10, error="boom")
    m = aggregate([a, b, failed], duration_s=4.0)
    assert (m["requests"], m["completed"], m["failed"], m["errors"]) == (3, 2, 1, ["boom"])
    assert m["output_tokens"] == 5 and m["input_tokens"] == 20
    assert m["output_throughput"] == pytest.approx(5 / 4)
    assert m["request_throughput"] == pytest.approx(2 / 4)
    assert m["ttft_ms"]["p50"] == pytest.approx(750.0)  # TTFTs 1.0 s and 0.5 s
    assert m["tpot_ms"]["mean"] == pytest.approx((1000.0 + 500.0) / 2)  # (3-1)/2 and (1-0.5)/1
    assert m["itl_ms"]["n"] == 3 and m["itl_ms"]["max"] == pytest.approx(1000.0)


def test_llama_3_1_8b_bytes_per_token_and_ceiling():
    cfg = load_hf_config("llama-3.1-8b")
    b = bytes_per_token(cfg, dtype_bytes=2, context=1024)
    h, i, layers, vocab = 4096, 14336, 32, 128256
    linear = layers * (h * (4096 + 2 * 1024) + 4096 * h + 3 * h * i) + vocab * h  # + lm_head
    replicated = layers * 2 * h + h + h  # norms, final norm, one embedding row
    assert b["weights"] == (linear + replicated) * 2 == 15_009_857_536
    assert b["kv"] == 2 * layers * 1024 * 1024 * 2  # K and V, 8 heads x 128, 1024 tokens, bf16
    assert b["total"] == b["weights"] + b["kv"]
    assert decode_ceiling(3.0e12, 15_000_000_000) == pytest.approx(200.0)
    tp2 = bytes_per_token(cfg, dtype_bytes=2, context=0, tp_size=2)
    assert tp2["weights"] == (linear // 2 + replicated) * 2


def test_tied_embeddings_still_read_the_whole_lm_head():
    cfg = load_hf_config("llama-tiny")  # tie_word_embeddings: true
    b = bytes_per_token(cfg, dtype_bytes=4, context=0)
    per_layer = 128 * (128 + 2 * 64) + 128 * 128 + 3 * 128 * 384
    assert b["weights"] == (4 * per_layer + 49152 * 128 + 4 * 2 * 128 + 128 + 128) * 4
    assert b["kv"] == 0


def test_card_name():
    assert card_name({"gpus": ["NVIDIA H100 80GB HBM3"]}) == "h100-80gb-hbm3"
    assert card_name({"gpus": []}) == "cpu"


class MergingTokenizer:
    """Greedy longest match over {"a", "b", "ab", "ba"} plus a BOS the encoder adds: decoding
    random ids and re-encoding changes the count, as real BPE tokenizers do."""

    pieces = ["<s>", "a", "b", "ab", "ba"]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, k = ([0] if add_special_tokens else []), 0
        while k < len(text):
            two = text[k : k + 2]
            if two in self.pieces:
                ids.append(self.pieces.index(two))
                k += 2
            else:
                ids.append(self.pieces.index(text[k]))
                k += 1
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize("length", [2, 3, 7, 64])
def test_exact_prompt_reaches_the_length_the_server_will_count(length):
    tok = MergingTokenizer()
    for seed in range(5):
        text, n = exact_prompt(tok, length, random.Random(seed), vocab=[1, 2, 3, 4])
        assert n == length
        assert len(tok.encode(text)) == length


def test_exact_prompt_refuses_a_length_without_room_for_text():
    with pytest.raises(ValueError, match="no room"):
        exact_prompt(MergingTokenizer(), 1, random.Random(0), vocab=[1, 2])


def test_exact_prompt_with_the_embedded_tokenizer():
    from bench.serve_bench import plain_vocab
    from launcher.embedded import embedded_model_path
    from router.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_model_path())
    rng = random.Random(0)
    vocab = plain_vocab(tok)
    for length in (128, 1000):
        text, n = exact_prompt(tok, length, rng, vocab=vocab)
        assert n == length == len(tok.encode(text))


def test_plan_and_prompt_counts():
    args = SimpleNamespace(
        plan=["128/128,1024/128|1,inf|8,64", "2048/128|16|"], presets=[], concurrency=[], num_prompts=[]
    )
    assert plan(args) == [
        ("128/128", [1, None], [8, 64]),
        ("1024/128", [1, None], [8, 64]),
        ("2048/128", [16], []),
    ]
    assert num_prompts_for(1, [], 0) == 32 and num_prompts_for(64, [], 0) == 256
    assert num_prompts_for(None, [], 0) == 256
    assert num_prompts_for(None, [8, 64], 1) == 64 and num_prompts_for(16, [5], 3) == 5


def test_stream_one_reads_tgi_sse_events():
    from aiohttp import ClientSession, web

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["parameters"]["max_new_tokens"] == 3 and body["parameters"]["ignore_eos_token"] is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(3):
            last = k == 2
            event = {
                "token": {"id": k, "text": "x", "logprob": -1.0, "special": False},
                "generated_text": "xxx" if last else None,
                "details": {"finish_reason": "length", "generated_tokens": 3} if last else None,
            }
            await resp.write(f"data:{json.dumps(event)}\n\n".encode())
        return resp

    async def run() -> RequestRecord:
        app = web.Application()
        app.router.add_post("/generate_stream", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with ClientSession() as s:
                return await stream_one(
                    s,
                    f"http://127.0.0.1:{port}",
                    prompt="hi",
                    input_tokens=1,
                    max_new_tokens=3,
                    extra_params={"ignore_eos_token": True},
                )
        finally:
            await runner.cleanup()

    rec = asyncio.run(run())
    assert rec.ok, rec.error
    assert (len(rec.chunk_times), rec.output_tokens, rec.finish_reason) == (3, 3, "length")
    assert rec.start < rec.chunk_times[0] <= rec.chunk_times[-1] <= rec.end


def test_equal_load_pairs_engine_waves_with_http_levels():
    from bench.equal_load import pair

    engine = {
        "batches": [
            {"batch": 1, "input_len": 128, "decode_steps": 127, "wave_tok_s": 150.0},
            {"batch": 64, "input_len": 128, "decode_steps": 127, "wave_tok_s": 8000.0},
            {"batch": 256, "input_len": 128, "decode_steps": 63, "wave_tok_s": 9000.0},  # other length
        ]
    }
    level = {"exact_output_fraction": 1.0, "failed": 0}
    http = {
        "levels": [
            {**level, "preset": "128/128", "concurrency": 1, "requests": 3, "output_throughput": 140.0},
            {**level, "preset": "128/128", "concurrency": "inf", "requests": 64, "output_throughput": 7600.0},
            {**level, "preset": "128/128", "concurrency": "inf", "requests": 256, "output_throughput": 9.0},
            {**level, "preset": "128/128", "concurrency": 16, "requests": 32, "output_throughput": 1.0},
            {**level, "preset": "128/128", "concurrency": "inf", "requests": 64, "failed": 3, "output_throughput": 1.0},
        ]
    }
    rows = pair(engine, http)
    assert [(r["batch"], r["http_over_engine"]) for r in rows] == [
        (1, pytest.approx(140 / 150)),
        (64, pytest.approx(0.95)),
    ]


@pytest.mark.slow
def test_batch_ceiling_counts_weights_once_and_kv_per_sequence():
    from bench.batch_ceiling import rows

    bandwidth = {
        "bandwidth": {"copy": {"bytes_per_s": 2e12}},
        "ceilings": [{"context": 0, "weights_bytes": 16e9, "kv_bytes": 0},
                     {"context": 1024, "weights_bytes": 16e9, "kv_bytes": 1024 * 131072}],
    }
    engine = {"batches": [{"batch": 100, "input_len": 1000, "decode_steps": 32, "decode_step_ms": {"p50": 20.0}}]}
    (r,) = rows(engine, bandwidth)
    assert r["mean_context"] == 1016
    assert r["bytes_per_step_gb"] == pytest.approx((16e9 + 100 * 1016 * 131072) / 1e9)
    assert r["floor_ms"] == pytest.approx((16e9 + 100 * 1016 * 131072) / 2e12 * 1e3)
    assert r["fraction_of_floor"] == pytest.approx(r["floor_ms"] / 20.0)


def test_engine_bench_against_a_real_shard(tmp_path):
    from bench.engine_bench import main

    out = tmp_path / "engine.json"
    # 128 KV tokens = 8 blocks of 16; a request of 16 + 6 + 2 tokens needs 2 blocks, so 4 fit:
    # batch 8 must be skipped, not attempted.
    flags = "--launch --model-id llama-tiny --batch-sizes 1,4,8 --input-len 16 --decode-steps 6 --steps-per-call 4"
    flags += " --prefill-lens 32 --runs 1"
    rc = main([*flags.split(), "--shard-args", "--kv-cache-tokens 128 --dtype float32", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["warmup"]["num_blocks"] == 8 and data["warmup"]["block_size"] == 16
    assert [b["batch"] for b in data["batches"]] == [1, 4] and data["skipped_batch_sizes"] == [8]
    for b in data["batches"]:
        assert b["missing_generations"] == 0
        assert b["decode_step_ms"]["n"] == 6  # 4 + 2 steps in two Decode calls
        assert b["decode_tok_s"] == pytest.approx(b["batch"] / (b["decode_step_ms"]["p50"] / 1e3))
        # the wave spans the prefill and every step: 7 tokens out of each request
        assert b["wave_ms"]["p50"] > b["prefill_ms"]["p50"]
        assert b["wave_tok_s"] == pytest.approx(b["batch"] * 7 / (b["wave_ms"]["p50"] / 1e3))
    assert data["prefill"][0]["input_len"] == 32 and data["prefill"][0]["prefill_ms"]["n"] == 1


def test_sched_bench_runs_the_router_scheduler_against_a_real_shard(tmp_path, monkeypatch):
    from bench.sched_bench import main

    monkeypatch.setenv("ROUTER_GC_TUNING", "0")  # the router's GC policy is for its own process
    from launcher.embedded import embedded_model_path

    out = tmp_path / "sched.json"
    router = f"--tokenizer-name {embedded_model_path()} --max-input-tokens 64 --max-total-tokens 128"
    router += " --max-concurrent-requests 4"
    rc = main(
        ["--launch", "--shard-args", "--model-id llama-tiny --load-format dummy --dtype float32",
         "--router-args", router, "--plan", "24/6|1,inf|2,6", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert (
        data["benchmark"] == "sched" and "max_concurrent_requests': 4" in data["server_info"]["router_config"]
    )
    one, burst = data["levels"]
    assert (one["concurrency"], one["completed"], one["failed"]) == (1, 2, 0)
    assert one["output_tokens"] == 12 and one["exact_output_fraction"] == 1.0
    assert one["finish_reasons"] == {"length": 2}
    # all 6 at once against a limit of 4 in flight: 2 are refused, as HTTP's 429 would be
    assert (burst["completed"], burst["failed"]) == (4, 2) and burst["errors"][0].startswith("overloaded")
    counters = burst["server_counters"]
    assert (
        counters["tgi_batch_inference_count/prefill"] >= 1
        and counters["tgi_batch_inference_count/decode"] >= 1
    )
    assert (
        0
        < counters["tgi_batch_forward_duration_sum/decode"]
        <= counters["tgi_batch_inference_duration_sum/decode"]
    )


def test_hf_baseline_uses_the_engine_dummy_weights_and_times_every_step():
    import torch

    from bench.hf_baseline import bench_shape, build_model
    from shard.native.loader import dummy_tensor

    model, vocab, source = build_model("llama-tiny", device="cpu", dtype=torch.float32, seed=3)
    w = model.model.layers[2].mlp.up_proj.weight
    assert torch.equal(
        w,
        dummy_tensor(
            "model.layers.2.mlp.up_proj.weight", tuple(w.shape), seed=3, dtype=torch.float32, device="cpu"
        ),
    )
    assert vocab == 49152 and source.startswith("dummy")
    r = bench_shape(
        model,
        batch=2,
        input_len=8,
        output_len=5,
        vocab=vocab,
        runs=2,
        device="cpu",
        static_cache=False,
        seed=0,
    )
    assert r["step_ms"]["n"] == 2 * 4  # (N - 1) decode steps per run
    assert r["decode_tok_s"] == pytest.approx(2 / (r["tpot_ms"] / 1e3))
    assert 0 < r["prefill_ms"] < r["total_ms"]


def test_scheduler_bench_counts_every_token_and_times_only_the_scheduler():
    from bench.scheduler_bench import run

    args = SimpleNamespace(prompts=48, input_len=20, output_len=9, max_batch_size=16, max_decode_steps=4, seed=3)
    res = asyncio.run(run(args))
    assert res["tokens"] == 48 * 9  # every request drained to its last token (the run asserts it too)
    # 48 requests through a batch of 16: at least three waves of decode calls of <= 4 steps each
    assert res["decode_calls"] >= 3 * math.ceil(8 / 4)
    assert 0 < res["shard_double_s"] < res["wall_s"] and res["scheduler_s"] == res["wall_s"] - res["shard_double_s"]
    assert res["scheduler_us_per_token"] == pytest.approx(1e6 * res["scheduler_s"] / res["tokens"])


def test_gpu_busy_is_absent_without_nvml(monkeypatch):
    import builtins

    from bench.common import GpuBusy

    real_import = builtins.__import__

    def no_nvml(name, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name == "pynvml":
            raise ImportError("no NVML here")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_nvml)
    with GpuBusy(period=0.01) as busy:
        pass
    assert busy.result() is None and busy.samples == []


def test_gpu_busy_averages_each_gpu_over_its_samples(monkeypatch):
    import sys
    import time

    from bench.common import GpuBusy

    class FakeNvml:  # two GPUs: one always busy, one idle
        @staticmethod
        def nvmlInit() -> None: ...

        @staticmethod
        def nvmlDeviceGetCount() -> int:
            return 2

        @staticmethod
        def nvmlDeviceGetHandleByIndex(i: int) -> int:
            return i

        @staticmethod
        def nvmlDeviceGetUtilizationRates(h: int) -> SimpleNamespace:
            return SimpleNamespace(gpu=100 if h == 0 else 0)

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml)
    with GpuBusy(period=0.005) as busy:
        time.sleep(0.05)
    assert len(busy.samples) >= 2 and busy.result() == [100.0, 0.0]


def test_gpu_busy_counts_only_the_samples_since_a_start(monkeypatch):
    """A level run by several client processes starts its clock after spawning them: the samples
    before its first request are left out."""
    import sys
    import time

    from bench.common import GpuBusy

    busy_now = [0]

    class FakeNvml:  # one GPU, idle until the level starts
        nvmlInit = staticmethod(lambda: None)
        nvmlDeviceGetCount = staticmethod(lambda: 1)
        nvmlDeviceGetHandleByIndex = staticmethod(lambda i: i)
        nvmlDeviceGetUtilizationRates = staticmethod(lambda h: SimpleNamespace(gpu=busy_now[0]))

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml)
    with GpuBusy(period=0.005) as busy:
        time.sleep(0.05)
        busy_now[0] = 100
        start = time.perf_counter()
        time.sleep(0.05)
    assert busy.result(since=start) == [100.0]
    assert 0 < busy.result()[0] < 100


def test_levels_table_shows_gpu_busy_per_gpu_or_a_dash():
    from bench.serve_bench import levels_table

    pct = {"p50": 1.0, "p99": 2.0}
    level = {
        "preset": "128/128", "concurrency": "inf", "request_throughput": 1.0, "output_throughput": 128.0,
        "ttft_ms": pct, "tpot_ms": pct, "itl_ms": pct, "exact_output_fraction": 1.0,
    }  # fmt: skip
    table = levels_table([{**level, "gpu_busy_pct": [87.9, 12.5]}, level])
    header, first, second = table.splitlines()[:3]
    assert header.split()[-3:] == ["GPU", "busy", "%"]
    assert first.split()[-1] == "87.9/12.5" and second.split()[-1] == "-"


def test_call_trace_pairs_a_real_stacks_calls_stage_by_stage(tmp_path, monkeypatch):
    """TGI_CALL_TRACE on a real shard (subprocess) and the router's scheduler (this process):
    bench.call_trace pairs every router call with the shard's, and the stages of each come out in
    order (a call paired with the wrong one would show a negative stage)."""
    import importlib

    import bench.call_trace as ct
    import router.calltrace
    from bench.sched_bench import main
    from launcher.embedded import embedded_model_path

    prefix = tmp_path / "tr"
    monkeypatch.setenv("ROUTER_GC_TUNING", "0")  # the router's GC policy is for its own process
    monkeypatch.setenv("TGI_CALL_TRACE", str(prefix))
    importlib.reload(router.calltrace)  # it reads the variable at import
    try:
        router_args = f"--tokenizer-name {embedded_model_path()} --max-input-tokens 64 --max-total-tokens 128"
        rc = main(
            ["--launch", "--shard-args", "--model-id llama-tiny --load-format dummy --dtype float32",
             "--router-args", router_args, "--plan", "24/12|inf|3", "--out", str(tmp_path / "s.json")]
        )  # fmt: skip
        assert rc == 0
    finally:
        monkeypatch.delenv("TGI_CALL_TRACE")
        importlib.reload(router.calltrace)
    calls = ct.calls(str(prefix))
    assert len(calls) >= 4 and {c["method"] for c in calls} == {"prefill", "decode"}
    order = ["send", "in", "engine_start", "engine_end", "built", "out", "recv", "parsed", "delivered"]
    for c in calls:
        times = [c[k] for k in order]
        assert times == sorted(times), c
    groups = ct.turnarounds(calls)
    rows = groups["decode -> decode"]
    assert rows
    for r in rows:
        stages = sum(v for k, v in r.items() if k not in ("total", "engine"))
        assert all(v >= 0 for v in r.values()) and stages == pytest.approx(r["total"], abs=1e-6)


def test_serve_bench_against_a_real_stack_reports_the_clients_cpu(tmp_path):
    """serve_bench end to end over real HTTP (a CPU stack of a tiny dummy Llama), with one client
    process and with two: every request completes with its exact length, and each level reports
    the busiest client process's CPU over the level's wall time (a share of one core)."""
    from bench.serve_bench import main
    from launcher.embedded import embedded_model_path

    out = tmp_path / "serve.json"
    launch = (f"--model-id shard/native/configs/llama-tiny.json --tokenizer-name {embedded_model_path()} "
              "--load-format dummy --dtype float32 --max-input-tokens 64 --max-total-tokens 128")  # fmt: skip
    for procs in (1, 2):  # one client process, then two sharing each level (prompts of 18-30 tokens)
        spread = "0" if procs == 1 else "0.25"
        rc = main([f"--launch={launch}", "--tokenizer", embedded_model_path(), "--plan", "24/6|1,inf|2,4",
                   "--warmup-requests", "1", "--client-procs", str(procs), "--out", str(out),
                   "--input-range", spread])  # fmt: skip
        assert rc == 0
        levels = json.loads(out.read_text())["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, "inf"]
        for lv in levels:
            assert lv["failed"] == 0 and lv["completed"] == (2 if lv["concurrency"] == 1 else 4)
            assert lv["exact_output_fraction"] == 1.0
            assert lv["exact_input_fraction"] == 1.0 and lv["input_range"] == float(spread)
            if procs == 1:
                assert lv["input_tokens"] == 24 * lv["completed"]
            assert lv["client_procs"] == (1 if lv["concurrency"] == 1 else procs)

            assert 0 < lv["client_cpu_fraction"] <= 1.0


def test_input_range_draws_lengths_around_the_preset():
    import random

    from bench.serve_bench import input_lengths, parse_args

    rng = random.Random(3)
    assert input_lengths(128, 5, rng, spread=0) == [128] * 5
    assert rng.random() == random.Random(3).random()  # no spread draws nothing: same prompts as before
    lens = input_lengths(1024, 2000, random.Random(1), spread=0.5)
    assert min(lens) >= 512 and max(lens) <= 1536 and len(set(lens)) > 500
    assert 950 < sum(lens) / len(lens) < 1100
    assert min(input_lengths(4, 200, random.Random(1), spread=0.9)) == 2  # never below 2 tokens
    assert parse_args(["--input-range", "0.25"]).input_range == 0.25
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            parse_args(["--input-range", bad])


def test_client_processes_split_the_concurrency_exactly():
    from bench.serve_bench import concurrency_shares

    assert concurrency_shares(1, 4) == [1]  # concurrency 1 stays one request at a time
    assert concurrency_shares(10, 4) == [3, 3, 2, 2]
    assert concurrency_shares(64, 4) == [16] * 4
    assert concurrency_shares(None, 3) == [None] * 3
    assert concurrency_shares(5, 1) == [5]
