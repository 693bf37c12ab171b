"""The shard's gRPC server, config and engine registry, in process, with the counting test double."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests.shard_test_engine` is what shard processes import too
    sys.path.insert(0, str(REPO))

from shard.config import ShardConfig, parse_args  # noqa: E402
from shard.dist import DistContext, resolve_layout  # noqa: E402
from shard.engine.base import (  # noqa: E402
    EngineConfigError,
    InvalidRequestError,
    OutOfResourcesError,
)
from shard.engine.registry import create_engine, resolve_factory  # noqa: E402
from shard.pb import generate_pb2 as pb  # noqa: E402
from shard.pb import generate_pb2_grpc  # noqa: E402
from shard.server import ShardServer, build_server, rank_urls  # noqa: E402
from tests.shard_test_engine import CountingTestEngine, create, token_logprob  # noqa: E402


@contextlib.contextmanager
def serving(engine: CountingTestEngine, addresses: list[str], urls: list[str]) -> Iterator[ShardServer]:
    """The server on its own event loop thread, so tests can use the blocking client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> ShardServer:
        server = build_server(engine, addresses, urls)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0, shutdown_engine=True), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def socket_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="shardtest-", dir="/tmp")  # short: unix socket paths max 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stub_for(url: str) -> generate_pb2_grpc.TextGenerationServiceStub:
    return generate_pb2_grpc.TextGenerationServiceStub(grpc.insecure_channel(url))


def make_request(
    request_id: int, input_ids: list[int], *, max_new_tokens: int, block_size: int = 4, **kwargs
) -> pb.Request:
    blocks = list(range(request_id * 10, request_id * 10 + math.ceil((len(input_ids) + 1) / block_size)))
    return pb.Request(
        id=request_id,
        input_ids=input_ids,
        sampling=pb.SamplingParameters(
            temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, seed=7
        ),
        stopping=pb.StoppingParameters(max_new_tokens=max_new_tokens),
        blocks=blocks,
        **kwargs,
    )


def test_every_rpc_round_trips_over_a_unix_socket(socket_dir: str) -> None:
    engine = CountingTestEngine(vocab_size=64, eos_token_ids=(0, 63), block_size=4, model_id="m")
    url = f"unix://{socket_dir}/shard-0"
    urls = [url, f"unix://{socket_dir}/shard-1"]
    with serving(engine, [url], urls):
        stub = stub_for(url)
        stub.Health(pb.HealthRequest())
        assert list(stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls) == urls

        info = stub.Info(pb.InfoRequest())
        assert (info.model_id, info.dtype, info.device_type) == ("m", "float32", "cpu")
        assert (info.world_size, info.tp_size, info.pp_size, info.block_size) == (1, 1, 1, 4)
        assert info.engine == pb.ENGINE_KIND_NATIVE and not info.manages_kv_cache
        assert (info.max_batch_size, info.max_input_tokens, info.max_total_tokens) == (8, 100, 200)
        assert (info.max_batch_prefill_tokens, info.max_beam_width, info.vocab_size) == (400, 1, 64)
        assert list(info.eos_token_ids) == [0, 63]
        assert info.supports_prefix_caching and info.supports_prefill_logprobs
        assert info.max_top_n_tokens == 5 and info.engine_version == "shard-test-engine world_sum=1"

        warm = stub.Warmup(pb.WarmupRequest(max_input_tokens=10, max_total_tokens=20, max_batch_size=2))
        assert (warm.num_blocks, warm.block_size, warm.max_supported_total_tokens) == (100, 4, 400)

        prefill = stub.Prefill(
            pb.PrefillRequest(
                requests=[
                    make_request(1, [5, 6, 7], max_new_tokens=3, top_n_tokens=2, prefill_logprobs=True),
                    make_request(2, [20], max_new_tokens=2, generated_before=0),
                    make_request(3, [61], max_new_tokens=5),
                ]
            )
        )
        gens = prefill.generations
        assert [(g.request_id, g.token_id, g.generated_tokens) for g in gens] == [
            (1, 8, 1),
            (2, 21, 1),
            (3, 62, 1),
        ]
        assert gens[0].logprob == pytest.approx(token_logprob(8))
        assert list(gens[0].top_tokens.ids) == [8, 9]
        assert list(gens[0].top_tokens.logprobs) == pytest.approx([token_logprob(8), token_logprob(8) - 1])
        assert gens[0].seed == 7 and gens[0].finish_reason == pb.FINISH_REASON_UNSPECIFIED
        assert list(gens[0].prefill_tokens.ids) == [5, 6, 7]
        assert math.isnan(gens[0].prefill_tokens.logprobs[0]) and list(
            gens[0].prefill_tokens.logprobs[1:]
        ) == [-1, -1]
        assert not gens[1].HasField("prefill_tokens") and len(gens[1].top_tokens.ids) == 0
        assert prefill.timings.forward_ns == 3 and prefill.timings.total_ns > 0

        # Request 3 reaches EOS 63 at step 0; request 2 hits max_new_tokens at step 0; request 1 at step 1.
        decode = stub.Decode(
            pb.DecodeRequest(extensions=[pb.BlockExtension(request_id=1, blocks=[90, 91])], max_steps=4)
        )
        c = decode.tokens
        steps = list(zip(c.request_ids, c.token_ids, c.generated_tokens, c.finish_reasons, strict=True))
        assert steps == [
            (1, 9, 2, pb.FINISH_REASON_UNSPECIFIED),
            (2, 22, 2, pb.FINISH_REASON_LENGTH),
            (3, 63, 2, pb.FINISH_REASON_EOS_TOKEN),
            (1, 10, 3, pb.FINISH_REASON_LENGTH),
        ]
        assert decode.steps == 2 and decode.timings.forward_ns == 2
        assert engine.running == {}

        stub.Prefill(
            pb.PrefillRequest(
                requests=[make_request(4, [1], max_new_tokens=9), make_request(5, [2], max_new_tokens=9)]
            )
        )
        assert stub.FilterBatch(pb.FilterBatchRequest(remove_ids=[4, 999])).running == 1
        assert list(engine.running) == [5]
        stub.ClearCache(pb.ClearCacheRequest())
        assert engine.running == {}
    assert engine.calls == ["info", "warmup", "prefill", "decode", "prefill", "filter", "clear"]
    assert engine.was_shut_down


def test_unix_socket_is_private_and_removed_on_stop(socket_dir: str) -> None:
    path = f"{socket_dir}/nested/shard-0"
    with serving(CountingTestEngine(), [f"unix://{path}"], [f"unix://{path}"]):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert not os.path.exists(path)


def _code(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), info.value.details()


def test_engine_errors_map_to_status_codes_and_keep_the_engine_healthy(socket_dir: str) -> None:
    engine = CountingTestEngine()
    url = f"unix://{socket_dir}/s-0"
    with serving(engine, [url], [url]):
        stub = stub_for(url)
        engine.fail_next = InvalidRequestError("block table too short")
        assert _code(stub.Prefill, pb.PrefillRequest(requests=[make_request(1, [1], max_new_tokens=1)])) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "block table too short",
        )
        engine.fail_next = OutOfResourcesError("decrease --max-batch-prefill-tokens")
        assert _code(stub.Warmup, pb.WarmupRequest())[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        engine.fail_next = EngineConfigError("bad config")
        assert _code(stub.Info, pb.InfoRequest()) == (grpc.StatusCode.FAILED_PRECONDITION, "bad config")
        # The engine's own checks and the boundary's validation go the same way.
        stub.Prefill(pb.PrefillRequest(requests=[make_request(1, [1], max_new_tokens=5)]))
        dup = pb.PrefillRequest(requests=[make_request(1, [1], max_new_tokens=5)])
        assert _code(stub.Prefill, dup)[0] == grpc.StatusCode.INVALID_ARGUMENT
        no_stop = pb.PrefillRequest(requests=[pb.Request(id=9, input_ids=[1], blocks=[0])])
        assert _code(stub.Prefill, no_stop)[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(stub.Decode, pb.DecodeRequest(max_steps=0))[0] == grpc.StatusCode.INVALID_ARGUMENT
        short = pb.PrefillRequest(
            requests=[
                pb.Request(
                    id=8, input_ids=[1, 2, 3, 4], stopping=pb.StoppingParameters(max_new_tokens=1), blocks=[0]
                )
            ]
        )
        assert _code(stub.Prefill, short)[0] == grpc.StatusCode.INVALID_ARGUMENT
        stub.Health(pb.HealthRequest())  # still healthy


def test_mixed_prefill_over_grpc_and_its_refusal(socket_dir: str) -> None:
    """decode_running reaches an engine that reports supports_mixed_batches (the running request's
    token comes back in decode_tokens, its extension applied); others answer INVALID_ARGUMENT."""
    url = f"unix://{socket_dir}/s-0"
    with serving(CountingTestEngine(mixed=True), [url], [url]):
        stub = stub_for(url)
        assert stub.Info(pb.InfoRequest()).supports_mixed_batches
        stub.Prefill(pb.PrefillRequest(requests=[make_request(1, [5, 6, 7], max_new_tokens=9)]))  # 1 block: 4 slots
        mixed = pb.PrefillRequest(requests=[make_request(2, [20], max_new_tokens=3)], decode_running=True)
        assert _code(stub.Prefill, mixed)[0] == grpc.StatusCode.INVALID_ARGUMENT  # request 1 has no room
        mixed.extensions.append(pb.BlockExtension(request_id=1, blocks=[99]))
        resp = stub.Prefill(mixed)
        assert list(zip(resp.decode_tokens.request_ids, resp.decode_tokens.token_ids, strict=True)) == [(1, 9)]
        assert [(g.request_id, g.token_id) for g in resp.generations] == [(2, 21)]
    url = f"unix://{socket_dir}/s-1"
    with serving(CountingTestEngine(), [url], [url]):
        stub = stub_for(url)
        assert not stub.Info(pb.InfoRequest()).supports_mixed_batches
        plain = pb.PrefillRequest(requests=[make_request(1, [5], max_new_tokens=2)], decode_running=True)
        assert _code(stub.Prefill, plain) == (
            grpc.StatusCode.INVALID_ARGUMENT, "Prefill.decode_running: this engine does not run mixed batches"
        )
        plain.decode_running = False
        plain.extensions.append(pb.BlockExtension(request_id=1, blocks=[3]))
        assert _code(stub.Prefill, plain)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_unexpected_error_is_internal_and_then_health_is_unavailable(socket_dir: str) -> None:
    engine = CountingTestEngine()
    url = f"unix://{socket_dir}/s-0"
    with serving(engine, [url], [url]):
        stub = stub_for(url)
        engine.fail_next = RuntimeError("CUDA error: device lost")
        code, details = _code(stub.Decode, pb.DecodeRequest(max_steps=1))
        assert code == grpc.StatusCode.INTERNAL and details == "RuntimeError: CUDA error: device lost"
        assert _code(stub.Health, pb.HealthRequest())[0] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("world_size", [1, 2])
def test_unexpected_error_ends_a_world_of_several_ranks(socket_dir: str, world_size: int) -> None:
    # Several ranks: the others may wait in a collective this rank left, so the rank exits (status
    # 1) after answering; alone, it stays up and reports UNAVAILABLE.
    engine = CountingTestEngine()
    url = f"unix://{socket_dir}/s-0"
    exits: list[int] = []
    with serving(engine, [url], [url]) as server:
        server.servicer.world_size = world_size
        server.servicer._exit = exits.append
        engine.fail_next = RuntimeError("CUDA error: out of memory")
        assert _code(stub_for(url).Prefill, pb.PrefillRequest())[0] == grpc.StatusCode.INTERNAL
        assert exits == []  # the answer first
        time.sleep(1.5)
    assert exits == ([1] if world_size > 1 else [])


def test_health_asks_an_idle_engine(socket_dir: str) -> None:
    engine = CountingTestEngine()
    url = f"unix://{socket_dir}/s-0"
    with serving(engine, [url], [url]):
        stub = stub_for(url)
        stub.Health(pb.HealthRequest())
        engine.is_healthy = False  # failed in the background, no RPC saw it
        assert _code(stub.Health, pb.HealthRequest())[0] == grpc.StatusCode.UNAVAILABLE
        engine.is_healthy = True  # UNAVAILABLE is for good: the shard must be restarted
        assert _code(stub.Health, pb.HealthRequest())[0] == grpc.StatusCode.UNAVAILABLE


def test_unexpected_error_of_a_still_healthy_engine_keeps_health_ok(socket_dir: str) -> None:
    engine = CountingTestEngine()
    url = f"unix://{socket_dir}/s-0"
    with serving(engine, [url], [url]):
        stub = stub_for(url)
        engine.fail_next = ValueError("oops")
        engine.healthy = lambda: True  # the engine says it can still serve
        assert _code(stub.ClearCache, pb.ClearCacheRequest()) == (
            grpc.StatusCode.INTERNAL,
            "ValueError: oops",
        )
        stub.Health(pb.HealthRequest())


class BlockingEngine(CountingTestEngine):
    """Prefill waits for `release`, to show Health is answered while the worker is busy."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def prefill(self, requests):
        self.entered.set()
        assert self.release.wait(timeout=10)
        return super().prefill(requests)


def test_health_answers_while_an_engine_call_runs(socket_dir: str) -> None:
    engine = BlockingEngine()
    url = f"unix://{socket_dir}/s-0"
    with serving(engine, [url], [url]):
        stub = stub_for(url)
        pending: Future = stub.Prefill.future(
            pb.PrefillRequest(requests=[make_request(1, [1], max_new_tokens=1)])
        )
        assert engine.entered.wait(timeout=10)
        stub.Health(pb.HealthRequest(), timeout=5)
        assert not pending.done()
        engine.release.set()
        assert [g.token_id for g in pending.result(timeout=10).generations] == [2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_server_round_trip() -> None:
    address = f"127.0.0.1:{_free_port()}"
    engine = CountingTestEngine()
    with serving(engine, [address], [address]):
        stub = stub_for(address)
        stub.Health(pb.HealthRequest())
        gens = stub.Prefill(pb.PrefillRequest(requests=[make_request(1, [3], max_new_tokens=1)])).generations
        assert [(g.token_id, g.finish_reason) for g in gens] == [(4, pb.FINISH_REASON_LENGTH)]


def test_a_taken_port_is_an_os_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        async def bind() -> None:
            build_server(CountingTestEngine(), [address], [address])

        with pytest.raises(OSError, match="cannot listen on 127.0.0.1:"):
            asyncio.run(bind())


# ---------------------------------------------------------------- config, layout, URLs, registry


def test_config_flags_win_over_env_and_env_over_defaults() -> None:
    env = {
        "SHARD_MODEL_ID": "/m",
        "SHARD_TP_SIZE": "2",
        "SHARD_CUDA_GRAPHS": "false",
        "SHARD_DTYPE": "float16",
    }
    config = parse_args(["--dtype", "bfloat16"], env=env)
    assert (config.model_id, config.tp_size, config.cuda_graphs, config.dtype) == ("/m", 2, False, "bfloat16")
    assert config.host is None and config.block_size == 16
    assert parse_args(["--model-id", "x", "--no-cuda-graphs"], env={}).cuda_graphs is False
    assert parse_args(["--model-id", "x", "--host", "0.0.0.0"], env={}).host == "0.0.0.0"


@pytest.mark.parametrize(
    "argv",
    [[], ["--model-id", "x", "--dtype", "int8"], ["--model-id", "x", "--uds-path", "/tmp/" + "a" * 120]],
)
def test_config_rejects_bad_values(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv, env={})
    assert info.value.code == 2


def test_listen_addresses_and_advertised_urls() -> None:
    uds = ShardConfig(model_id="m", uds_path="/tmp/x/shard")
    assert uds.listen_address(1) == "unix:///tmp/x/shard-1"
    dist = DistContext.single()
    dist2 = DistContext(**{**dist.__dict__, "world_size": 2, "tp_size": 2, "hostnames": ("a", "b")})
    assert rank_urls(uds, dist2) == ["unix:///tmp/x/shard-0", "unix:///tmp/x/shard-1"]
    tcp = ShardConfig(model_id="m", host="0.0.0.0", port=6000)
    assert tcp.listen_address(1) == "0.0.0.0:6001"
    assert rank_urls(tcp, dist2) == ["a:6000", "b:6001"]
    advertised = ShardConfig(model_id="m", host="0.0.0.0", port=6000, advertise_host="shards")
    assert rank_urls(advertised, dist2) == ["shards:6000", "shards:6001"]
    assert ShardConfig(model_id="m", host="::1", port=7).listen_address(0) == "[::1]:7"


def test_layout_is_checked_against_the_world() -> None:
    assert resolve_layout(ShardConfig(model_id="m"), 4) == (4, 1)
    assert resolve_layout(ShardConfig(model_id="m", pp_size=2), 4) == (2, 2)
    with pytest.raises(EngineConfigError, match="mpiexec -n 6"):
        resolve_layout(ShardConfig(model_id="m", tp_size=3, pp_size=2), 4)
    with pytest.raises(EngineConfigError, match="not a multiple"):
        resolve_layout(ShardConfig(model_id="m", pp_size=3), 4)


def test_registry_resolves_names_and_factories() -> None:
    dist = DistContext.single(torch.device("cpu"))
    engine = create_engine(
        ShardConfig(model_id="m", engine="tests.shard_test_engine:create", block_size=8), dist
    )
    assert isinstance(engine, CountingTestEngine) and engine.block_size == 8 and engine.model_id == "m"
    assert resolve_factory("tests.shard_test_engine:create") is create
    for bad, message in [
        ("nope", "unknown engine"),
        ("tests.shard_test_engine:missing", "no callable"),
        ("no_such_module_xyz:create", "cannot import"),
    ]:
        with pytest.raises(EngineConfigError, match=message):
            resolve_factory(bad)


def test_simulated_cost_sleeps_as_the_gpu_would(monkeypatch) -> None:
    """TEST_ENGINE_SIMULATE (bench/router_bench.py --simulate): a prefill sleeps its base plus its
    prompt tokens' share, each decode step its base plus its rows' share; 0 ms sleeps nothing."""
    from shard.engine.types import NewRequest, SamplingParams, StoppingParams

    monkeypatch.setenv("TEST_ENGINE_SIMULATE", "20,5,10,1")
    engine = create(ShardConfig(model_id="m"), DistContext.single("cpu"))
    assert engine.cost == (20.0, 5.0, 10.0, 1.0)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    stop = StoppingParams(max_new_tokens=10)
    requests = [NewRequest(id=i, input_ids=(5,) * 30, sampling=SamplingParams(), stopping=stop, blocks=tuple(range(i * 8, i * 8 + 8)))
                for i in range(2)]  # fmt: skip
    engine.prefill(requests)
    engine.decode({}, max_steps=3)
    assert slept == pytest.approx([(10 + 60) / 1e3] + [(20 + 5 * 2) / 1e3] * 3)
    monkeypatch.delenv("TEST_ENGINE_SIMULATE")
    assert create(ShardConfig(model_id="m"), DistContext.single("cpu")).cost is None
