"""TensorRT-LLM engine adapter: serves a prebuilt engine folder through tensorrt_llm.bindings.executor.

NOT RUN AGAINST A REAL TensorRT-LLM. TensorRT-LLM cannot be installed on the machines this project was
built on (PyPI's tensorrt-llm is a stub that downloads from NVIDIA's index, which they cannot reach).
This adapter follows the documented Executor API of TensorRT-LLM 0.16 to 1.2 and has been run only
against the test double in tests/trtllm_double. See docs/trtllm.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from shard.config import ShardConfig
from shard.dist import DistContext
from shard.engine.base import EngineError, OutOfResourcesError
from shard.engine.types import (
    EngineInfo,
    NewRequest,
    SamplingParams,
    StepResult,
    StoppingParams,
    WarmupResult,
    WarmupSpec,
)
from shard.trtllm.limits import check_caps
from shard.trtllm.mapping import SpecialIds
from shard.trtllm.responses import ResponseBridge, stats_as_dict
from shard.trtllm.running import RunningSet
from shard.trtllm.startup import (
    Abort,
    Allgather,
    HostFacts,
    check_engine,
    construct_executor,
    detect_host,
    engine_info,
    mpi_abort,
    mpi_allgather,
    refuse,
)
from shard.trtllm.validate import EngineConfig

log = logging.getLogger(__name__)


class TrtllmEngine:
    """The Engine protocol over a TensorRT-LLM Executor (leader mode).

    Contract with the router (it reads manages_kv_cache=True in Info): no block tables, no prefix
    caching, admission by token budget (Warmup's max_supported_total_tokens). TensorRT-LLM batches in
    flight on its own; this class only feeds it and collects its tokens:
    - Prefill enqueues every request (streaming) and blocks until each has its first token (or the
      first-token timeout, or the executor failing), then returns one Generation per request.
    - Decode blocks until at least one running request has a new token, then returns what arrived,
      at most max_steps per request, step-major. A request may be absent from a Decode answer.
    - FilterBatch cancels router-ended requests in TensorRT-LLM (cancel_request).
    - A request finishing in TensorRT-LLM (end_id, stop token, max_tokens) reports EOS_TOKEN or LENGTH
      on its last token and leaves the running set.

    Multi-GPU (tp x pp > 1): every MPI rank builds the Executor on its own rank{r}.engine (leader
    mode); only rank 0 enqueues and reads responses. The router fans every call out to every rank
    and uses rank 0's answers: ranks != 0 return empty Prefill/Decode results at once and answer
    Info/Health/Warmup from static facts. A refusal at start-up on any rank stops all ranks (see
    startup.py); Prefill and Decode never wait without a deadline, and wake when the response
    thread fails.

    Threading: engine methods run on one thread (shard.server); the response thread (responses.py)
    is the only other thread touching request state, under the bridge's lock.
    """

    def __init__(
        self,
        *,
        executor: Any,
        trtllm: Any,
        engine: EngineConfig,
        special: SpecialIds,
        info: EngineInfo,
        bridge: ResponseBridge | None,  # None on ranks != 0
        block_reuse: bool,
        first_token_timeout_s: float,
        stall_timeout_s: float,
    ) -> None:
        self._executor = executor
        self._trtllm = trtllm
        self._engine = engine
        self._special = special
        self._info = info
        self._bridge = bridge
        self.block_reuse = block_reuse
        self._first_token_timeout_s = first_token_timeout_s
        self._stall_timeout_s = stall_timeout_s
        # Requests in TensorRT-LLM; rank 0 only (the others never enqueue).
        self._running = (
            None
            if bridge is None
            else RunningSet(
                bridge=bridge, executor=executor, trtllm=trtllm, special=special, limits=engine.limits
            )
        )
        self._closed = False

    # ------------------------------------------------------------ construction

    @classmethod
    def create(cls, config: ShardConfig, dist: DistContext) -> TrtllmEngine:
        multi = dist.world_size > 1
        return cls.build(
            config,
            dist,
            host=detect_host(dist.device),
            allgather=mpi_allgather if multi else None,
            abort=mpi_abort if multi else None,
        )

    @classmethod
    def build(
        cls,
        config: ShardConfig,
        dist: DistContext,
        *,
        host: HostFacts,
        allgather: Allgather | None = None,
        abort: Abort | None = None,
        first_token_timeout_s: float = 300.0,
        stall_timeout_s: float = 300.0,
        poll_s: float = 0.25,
        stats_interval_s: float = 5.0,
    ) -> TrtllmEngine:
        """create() with the host facts and MPI hooks given (tests pass the double and fakes)."""
        caps = (config.max_batch_size, config.max_input_tokens, config.max_total_tokens)
        checked = check_engine(
            model_id=config.model_id,
            tokenizer_name=config.tokenizer_name,
            caps=caps,
            world_size=dist.world_size,
            host=host,
            allgather=allgather,
        )
        engine = checked.engine
        log.info(
            "loading %s (%s layout, TensorRT-LLM %s, tp %d x pp %d) on rank %d",
            engine.engine_dir,
            checked.location.layout,
            host.trtllm_version,
            engine.tp_size,
            engine.pp_size,
            dist.rank,
        )
        executor, reuse = construct_executor(
            host.trtllm,
            engine,
            kv_cache_fraction=config.kv_cache_fraction,
            max_batch_size=config.max_batch_size,
            version=host.trtllm_version,
            abort=abort,
            scheduler_policy=config.scheduler_policy,
        )
        bridge = None
        if dist.rank == 0:
            if not executor.can_enqueue_requests():
                refuse("rank 0 built the Executor but it cannot enqueue requests (not the leader?)", abort)
            bridge = ResponseBridge(executor, poll_s=poll_s, stats_interval_s=stats_interval_s)
            bridge.start()
        info = engine_info(
            model_id=config.model_id,
            engine=engine,
            eos_token_ids=checked.special.eos_ids,
            version=host.trtllm_version or "",
            caps=caps,
        )
        return cls(
            executor=executor,
            trtllm=host.trtllm,
            engine=engine,
            special=checked.special,
            info=info,
            bridge=bridge,
            block_reuse=reuse,
            first_token_timeout_s=first_token_timeout_s,
            stall_timeout_s=stall_timeout_s,
        )

    # ------------------------------------------------------------ Engine protocol

    def info(self) -> EngineInfo:
        return self._info

    def warmup(self, spec: WarmupSpec) -> WarmupResult:
        """Checks the router's limits, runs the longest prompt once, reads the KV capacity.

        TensorRT-LLM sized its KV cache when the Executor was built (--kv-cache-fraction of the free
        memory); the token budget comes from its iteration stats (blocks x tokens per block).
        """
        check_caps(
            self._engine.limits,
            max_batch_size=spec.max_batch_size,
            max_input_tokens=spec.max_input_tokens,
            max_total_tokens=spec.max_total_tokens,
        )
        if self._bridge is None:
            return WarmupResult(num_blocks=0, block_size=0, max_supported_total_tokens=self._static_budget())
        self._run_warmup_request(spec.max_input_tokens or self._info.max_input_tokens)
        budget = self._kv_budget()
        need = spec.max_total_tokens or self._info.max_total_tokens
        if budget < need:
            raise OutOfResourcesError(
                f"TensorRT-LLM's KV cache holds {budget} tokens, less than one request of --max-total-tokens {need}: "
                "raise --kv-cache-fraction or lower --max-total-tokens"
            )
        return WarmupResult(num_blocks=0, block_size=0, max_supported_total_tokens=budget)

    def prefill(self, requests: Sequence[NewRequest]) -> StepResult:
        if self._bridge is None or self._running is None:
            return StepResult(generations=[], steps=0)  # ranks != 0: the router uses rank 0's answer
        started = time.perf_counter_ns()
        self._check_alive()
        batch = self._running.prepare(requests)
        exec_ids = self._running.enqueue(batch)
        ids = [p.request.id for p in batch]
        first = self._bridge.wait(
            lambda t: all(t[e].pending or t[e].error for e in exec_ids), self._first_token_timeout_s
        )
        taken = self._bridge.take(exec_ids, 1) if first else {}
        errors = [
            f"request {r}: {taken[e][1]}"
            for r, e in zip(ids, exec_ids, strict=True)
            if e in taken and taken[e][1]
        ]
        if not first or errors:
            self._running.drop(ids, cancel=True)  # the whole batch fails together, nothing left running
            self._check_alive()
            if errors:
                raise EngineError("TensorRT-LLM failed " + "; ".join(errors))
            raise EngineError(
                f"TensorRT-LLM gave no first token within {self._first_token_timeout_s:.0f} s for "
                f"{len(batch)} request(s); they were cancelled"
            )
        generations = [
            g for r, e in zip(ids, exec_ids, strict=True) for g in self._running.generations(r, taken[e][0])
        ]
        return StepResult(generations=generations, steps=1, forward_ns=time.perf_counter_ns() - started)

    def decode(self, extensions: dict[int, Sequence[int]], max_steps: int) -> StepResult:
        del extensions  # TensorRT-LLM manages its own KV cache
        if self._bridge is None or not self._running:
            return StepResult(generations=[], steps=0)
        started = time.perf_counter_ns()
        running = {rid: self._running.exec_id(rid) for rid in self._running.ids()}
        exec_ids = list(running.values())
        if not self._bridge.wait(
            lambda t: any(t[e].pending or t[e].error for e in exec_ids), self._stall_timeout_s
        ):
            self._check_alive()
            raise EngineError(
                f"TensorRT-LLM produced no token in {self._stall_timeout_s:.0f} s for {len(exec_ids)} running request(s)"
            )
        taken = self._bridge.take(exec_ids, max(1, max_steps))
        failed = [(rid, taken[e][1]) for rid, e in running.items() if taken[e][1]]
        if failed:
            self._running.drop([rid for rid, _ in failed], cancel=False)
            raise EngineError(
                "TensorRT-LLM failed " + "; ".join(f"request {rid}: {err}" for rid, err in failed)
            )
        per_request = [self._running.generations(rid, taken[e][0]) for rid, e in running.items()]
        steps = max((len(g) for g in per_request), default=0)
        # Step-major: every request's k-th new token before anyone's (k+1)-th.
        generations = [gens[k] for k in range(steps) for gens in per_request if k < len(gens)]
        return StepResult(generations=generations, steps=steps, forward_ns=time.perf_counter_ns() - started)

    def filter(self, remove_ids: Sequence[int]) -> int:
        if self._running is None:
            return 0
        self._running.drop(remove_ids, cancel=True)
        return len(self._running)

    def clear(self) -> None:
        if self._running is not None:
            self._running.drop(self._running.ids(), cancel=True)

    def healthy(self) -> bool:
        if self._closed:
            return False
        if self._bridge is None:
            return True  # ranks != 0: a dead rank takes the MPI world (and rank 0's executor) down
        return self._bridge.alive() and bool(self._executor.can_enqueue_requests())

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bridge is not None:
            self._bridge.stop()
        try:
            self._executor.shutdown()
        except Exception:
            log.exception("TensorRT-LLM executor shutdown failed")

    # ------------------------------------------------------------ observability

    def iteration_stats(self) -> dict[str, Any] | None:
        """TensorRT-LLM's latest iteration statistics (active/queued requests, KV blocks, latency) as
        plain data; None before the first iteration or on ranks != 0. Refreshed by the response
        thread every stats_interval_s; a server endpoint or metrics exporter may call this."""
        if self._bridge is None:
            return None
        stats = self._bridge.iteration_stats()
        return None if stats is None else stats_as_dict(stats)

    # ------------------------------------------------------------ internals

    def _check_alive(self) -> None:
        if self._closed:
            raise EngineError("the TensorRT-LLM engine is shut down")
        if self._bridge is not None and not self._bridge.alive():
            raise EngineError(
                f"the TensorRT-LLM executor failed: {self._bridge.fatal or 'response thread stopped'}"
            )

    def _run_warmup_request(self, prompt_tokens: int) -> None:
        """One greedy request of the longest prompt the router will send, 2 new tokens, EOS ignored."""
        vocab = max(self._engine.vocab_size - 1, 1)
        n = max(1, min(prompt_tokens, self._info.max_input_tokens, self._info.max_total_tokens - 1))
        request = NewRequest(
            id=-1,
            input_ids=tuple(1 + i % vocab for i in range(n)),
            sampling=SamplingParams(),
            stopping=StoppingParams(
                max_new_tokens=min(2, self._info.max_total_tokens - n), ignore_eos_token=True
            ),
        )
        self.prefill([request])
        assert self._bridge is not None and self._running is not None
        exec_id = self._running.exec_id(request.id)
        if exec_id is not None:  # wait for the second token, then drop the request
            self._bridge.wait(lambda t: exec_id not in t or t[exec_id].finished, self._first_token_timeout_s)
            self._running.drop([request.id], cancel=True)

    def _kv_budget(self) -> int:
        assert self._bridge is not None
        stats = self._bridge.iteration_stats(refresh=True)
        kv = getattr(stats, "kv_cache_stats", None)
        blocks, per_block = getattr(kv, "max_num_blocks", 0), getattr(kv, "tokens_per_block", 0)
        if blocks and per_block:
            return int(blocks) * int(per_block)
        log.warning("TensorRT-LLM reported no KV cache statistics; assuming the engine's static bound")
        return self._static_budget()

    def _static_budget(self) -> int:
        return self._info.max_batch_size * self._info.max_total_tokens
