"""TEST DOUBLE of the shard Engine: deterministic counting, no model, no tensors (except the
all_reduce that proves torch.distributed works). Never used to serve; it exists so tests can run
the real gRPC server and real shard processes (`python -m shard --engine tests.shard_test_engine:create`).

Behaviour:
- The next token is (last token + 1) % vocab_size, with logprob -(token % 4) / 4. top-n alternatives
  are token, token+1, ... with falling logprobs. Prompt logprobs: NaN for the first, then -1.0.
- A request finishes with LENGTH at max_new_tokens (counting generated_before), with EOS_TOKEN when
  it emits an EOS or stop id (unless ignore_eos_token), and then leaves the running set.
- Block tables are checked like a paged engine: ceil((tokens + 1) / block_size) blocks at least.
- `fail_next = SomeError(...)` makes the next engine call raise it; a non-EngineError also marks the
  engine unhealthy (a broken device). In processes: TEST_ENGINE_FAIL=start (raise in create),
  prefill (the process exits with status 3 at the first Prefill) or prefill-error (the first Prefill
  raises RuntimeError, like a CUDA out-of-memory), on TEST_ENGINE_FAIL_RANK (default: all);
  TEST_ENGINE_HANG_RANK=r: rank r's first Prefill never returns (a rank left waiting in a
  collective its peer never joined).
- `mixed=True` (TEST_ENGINE_MIXED=1 in processes) reports supports_mixed_batches: a Prefill with
  decode_running steps the running set first (admission order), then takes the new requests.
- `cost` (TEST_ENGINE_SIMULATE="decode_ms,decode_ms_per_row,prefill_ms,prefill_ms_per_token" in
  processes): each call sleeps as long as a GPU would take, so the serving path's own delays show
  against a known engine time on a machine without one (bench/router_bench.py --simulate).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from shard.config import ShardConfig
from shard.dist import DistContext
from shard.engine.base import EngineError, InvalidRequestError
from shard.engine.types import (
    EngineInfo,
    EngineKind,
    FinishReason,
    Generation,
    NewRequest,
    StepResult,
    TopTokens,
    WarmupResult,
    WarmupSpec,
)

CRASH_EXIT_STATUS = 3


def token_logprob(token: int) -> float:
    return -(token % 4) / 4


@dataclass
class _Running:
    request: NewRequest
    tokens: list[int]
    blocks: list[int]
    generated: int  # including generated_before


@dataclass
class CountingTestEngine:
    vocab_size: int = 64
    eos_token_ids: tuple[int, ...] = (0,)
    block_size: int = 4
    num_blocks: int = 100
    max_total_tokens: int = 200
    model_id: str = "test-double"
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    device_type: str = "cpu"
    world_sum: int = 1  # result of the start-up all_reduce (sum of rank + 1 over the world)
    crash_at_prefill: bool = False
    error_at_prefill: bool = False
    hang_at_prefill: bool = False
    mixed: bool = False
    # (decode ms per step, + ms per running row, prefill ms per call, + ms per prompt token)
    cost: tuple[float, float, float, float] | None = None
    # Set by create() (real shard processes): Info then reports the engine thread's torch threads
    # and whether calls run on the thread that built the engine (shard/server.py engine_thread).
    creator_thread: int | None = None
    fail_next: Exception | None = None
    calls: list[str] = field(default_factory=list)
    running: dict[int, _Running] = field(default_factory=dict)
    is_healthy: bool = True
    was_shut_down: bool = False

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            if not isinstance(error, EngineError):
                self.is_healthy = False
            raise error

    def info(self) -> EngineInfo:
        self._enter("info")
        return EngineInfo(
            model_id=self.model_id,
            dtype="float32",
            device_type=self.device_type,
            world_size=self.world_size,
            tp_size=self.tp_size,
            pp_size=self.pp_size,
            engine=EngineKind.NATIVE,
            block_size=self.block_size,
            manages_kv_cache=False,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            max_batch_size=8,
            max_input_tokens=100,
            max_total_tokens=self.max_total_tokens,
            max_batch_prefill_tokens=400,
            max_top_n_tokens=5,
            engine_version=f"shard-test-engine world_sum={self.world_sum}{self._thread_report()}",
            supports_mixed_batches=self.mixed,
        )

    def _thread_report(self) -> str:
        if self.creator_thread is None:
            return ""
        import torch

        same = threading.get_ident() == self.creator_thread
        return f" threads={torch.get_num_threads()} on_creator_thread={same}"

    def warmup(self, spec: WarmupSpec) -> WarmupResult:
        self._enter("warmup")
        return WarmupResult(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_supported_total_tokens=self.num_blocks * self.block_size,
        )

    def _check_blocks(self, req: _Running) -> None:
        needed = math.ceil((len(req.tokens) + 1) / self.block_size)
        if len(req.blocks) < needed:
            raise InvalidRequestError(
                f"request {req.request.id}: {len(req.blocks)} blocks cannot hold {len(req.tokens) + 1} tokens"
            )

    def _next(self, req: _Running) -> Generation:
        self._check_blocks(req)
        token = (req.tokens[-1] + 1) % self.vocab_size
        req.tokens.append(token)
        req.generated += 1
        stopping = req.request.stopping
        finish = None
        stop_ids = set(self.eos_token_ids) | set(stopping.stop_token_ids)
        if not stopping.ignore_eos_token and token in stop_ids:
            finish = FinishReason.EOS_TOKEN
        elif req.generated >= stopping.max_new_tokens:
            finish = FinishReason.LENGTH
        n = req.request.top_n_tokens
        top = TopTokens(
            ids=tuple((token + i) % self.vocab_size for i in range(n)),
            logprobs=tuple(token_logprob(token) - i for i in range(n)),
        )
        if finish is not None:
            del self.running[req.request.id]
        return Generation(
            request_id=req.request.id,
            token_id=token,
            logprob=token_logprob(token),
            generated_tokens=req.generated,
            seed=req.request.sampling.seed,
            finish_reason=finish,
            top_tokens=top,
        )

    def prefill(
        self, requests: Sequence[NewRequest], *, decode_running: dict[int, Sequence[int]] | None = None
    ) -> StepResult:
        self._enter("prefill")
        if self.crash_at_prefill:
            os._exit(CRASH_EXIT_STATUS)  # a crashed rank: no cleanup, like a segfault
        if self.error_at_prefill:
            self.error_at_prefill = self.is_healthy = False
            raise RuntimeError("Triton Error [CUDA]: out of memory (test double)")
        if self.hang_at_prefill:
            threading.Event().wait()  # forever
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids) or any(i in self.running for i in ids):
            raise InvalidRequestError(f"duplicate request id in {ids}")
        decode_generations = []
        if decode_running is not None:  # mixed batch: the running set steps first, in admission order
            self._extend(decode_running)
            decode_generations = [self._next(req) for req in list(self.running.values())]
        generations = []
        for r in requests:
            req = _Running(
                request=r, tokens=list(r.input_ids), blocks=list(r.blocks), generated=r.generated_before
            )
            self.running[r.id] = req
            gen = self._next(req)
            if r.prefill_logprobs:
                prompt = TopTokens(ids=r.input_ids, logprobs=(math.nan,) + (-1.0,) * (len(r.input_ids) - 1))
                gen = dataclasses.replace(gen, prefill_tokens=prompt)
            generations.append(gen)
        if self.cost is not None:
            rows = sum(len(r.input_ids) for r in requests)
            time.sleep((self.cost[2] + self.cost[3] * rows + self._decode_ms(len(decode_generations))) / 1e3)
        return StepResult(
            generations=generations, steps=1, forward_ns=len(requests), decode_generations=decode_generations
        )

    def _decode_ms(self, rows: int) -> float:
        assert self.cost is not None
        return self.cost[0] + self.cost[1] * rows if rows else 0.0

    def decode(self, extensions: dict[int, Sequence[int]], max_steps: int) -> StepResult:
        self._enter("decode")
        self._extend(extensions)
        generations: list[Generation] = []
        steps = 0
        while steps < max_steps and self.running:
            if self.cost is not None:
                time.sleep(self._decode_ms(len(self.running)) / 1e3)
            # Step-major: every running request advances once per step, in admission order.
            generations.extend(self._next(req) for req in list(self.running.values()))
            steps += 1
        return StepResult(generations=generations, steps=steps, forward_ns=steps)

    def _extend(self, extensions: dict[int, Sequence[int]]) -> None:
        unknown = set(extensions) - set(self.running)
        if unknown:
            raise InvalidRequestError(f"block extensions for requests not running: {sorted(unknown)}")
        for request_id, blocks in extensions.items():
            self.running[request_id].blocks.extend(blocks)

    def filter(self, remove_ids: Sequence[int]) -> int:
        self._enter("filter")
        for request_id in remove_ids:
            self.running.pop(request_id, None)
        return len(self.running)

    def clear(self) -> None:
        self._enter("clear")
        self.running.clear()

    def healthy(self) -> bool:
        return self.is_healthy

    def shutdown(self) -> None:
        self.was_shut_down = True


def _world_sum(dist: DistContext) -> int:
    """all_reduce(rank + 1) over the world and over my TP group: proves the process groups work."""
    if dist.world_size == 1:
        return 1
    import torch
    import torch.distributed

    world = torch.tensor([dist.rank + 1], dtype=torch.int64, device=dist.device)
    torch.distributed.all_reduce(world)
    expected = dist.world_size * (dist.world_size + 1) // 2
    if int(world.item()) != expected:
        raise RuntimeError(f"all_reduce gave {int(world.item())}, expected {expected}")
    for name, group, size in (("TP", dist.tp_group, dist.tp_size), ("PP", dist.pp_group, dist.pp_size)):
        if group is not None:
            ones = torch.ones(1, dtype=torch.int64, device=dist.device)
            torch.distributed.all_reduce(ones, group=group)
            if int(ones.item()) != size:
                raise RuntimeError(f"{name} all_reduce gave {int(ones.item())}, expected {size}")
    return int(world.item())


def create(config: ShardConfig, dist: DistContext) -> CountingTestEngine:
    """Engine factory for `--engine tests.shard_test_engine:create`."""
    fail = os.environ.get("TEST_ENGINE_FAIL", "")
    fail_rank = os.environ.get("TEST_ENGINE_FAIL_RANK", "")
    fails_here = fail_rank == "" or int(fail_rank) == dist.rank
    if fail == "start" and fails_here:
        raise RuntimeError(f"test double told to fail at start on rank {dist.rank}")
    return CountingTestEngine(
        # TEST_ENGINE_VOCAB_SIZE: tokens beyond the 64 default, e.g. ordinary words of a real
        # tokenizer for bench/router_bench.py.
        vocab_size=int(os.environ.get("TEST_ENGINE_VOCAB_SIZE", "64")),
        block_size=config.block_size,
        num_blocks=int(os.environ.get("TEST_ENGINE_NUM_BLOCKS", "100")),
        max_total_tokens=int(os.environ.get("TEST_ENGINE_MAX_TOTAL_TOKENS", "200")),
        model_id=config.model_id,
        world_size=dist.world_size,
        tp_size=dist.tp_size,
        pp_size=dist.pp_size,
        device_type=dist.device.type,
        world_sum=_world_sum(dist),
        crash_at_prefill=fail == "prefill" and fails_here,
        error_at_prefill=fail == "prefill-error" and fails_here,
        hang_at_prefill=os.environ.get("TEST_ENGINE_HANG_RANK", "") == str(dist.rank),
        creator_thread=threading.get_ident(),
        mixed=os.environ.get("TEST_ENGINE_MIXED", "") == "1",
        cost=_parse_cost(os.environ.get("TEST_ENGINE_SIMULATE", "")),
    )


def _parse_cost(text: str) -> tuple[float, float, float, float] | None:
    if not text:
        return None
    decode_ms, per_row, prefill_ms, per_token = (float(x) for x in text.split(","))
    return decode_ms, per_row, prefill_ms, per_token
