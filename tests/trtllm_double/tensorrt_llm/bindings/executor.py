"""TEST DOUBLE of tensorrt_llm.bindings.executor, NOT TensorRT-LLM: same names, keyword arguments,
enums and Response/Result fields as the documented Executor API (0.16-1.2), a deterministic token
generator instead of a model. See tests/trtllm_double/README.md for its behaviour."""

from __future__ import annotations

import datetime
import enum
import itertools
import json
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

__version__ = "1.0.0"


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = 0
    GUARANTEED_NO_EVICT = 1
    STATIC_BATCH = 2


class CommunicationType(enum.Enum):
    MPI = 0


class CommunicationMode(enum.Enum):
    LEADER = 0
    ORCHESTRATOR = 1


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: {message}")  # what a TLLM_CHECK raises


class SamplingConfig:
    def __init__(
        self,
        beam_width: int = 1,
        *,
        top_k: int | None = None,
        top_p: float | None = None,
        top_p_min: float | None = None,
        top_p_reset_ids: int | None = None,
        top_p_decay: float | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        min_tokens: int | None = None,
        beam_search_diversity_rate: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        length_penalty: float | None = None,
        early_stopping: int | None = None,
        no_repeat_ngram_size: int | None = None,
        num_return_sequences: int | None = None,
    ) -> None:
        _check(beam_width >= 1, "beamWidth must be >= 1")
        _check(top_k is None or top_k >= 0, "topK must be >= 0")
        _check(top_p is None or 0.0 < top_p <= 1.0, "topP must be in (0, 1]")
        _check(temperature is None or temperature > 0.0, "temperature must be > 0")
        _check(repetition_penalty is None or repetition_penalty > 0.0, "repetitionPenalty must be > 0")
        _check(seed is None or seed >= 0, "seed must be a uint64")
        self.beam_width = beam_width
        self.top_k, self.top_p, self.top_p_min = top_k, top_p, top_p_min
        self.top_p_reset_ids, self.top_p_decay, self.seed = top_p_reset_ids, top_p_decay, seed
        self.temperature, self.min_tokens = temperature, min_tokens
        self.beam_search_diversity_rate = beam_search_diversity_rate
        self.repetition_penalty, self.presence_penalty = repetition_penalty, presence_penalty
        self.frequency_penalty, self.length_penalty = frequency_penalty, length_penalty
        self.early_stopping, self.no_repeat_ngram_size = early_stopping, no_repeat_ngram_size
        self.num_return_sequences = num_return_sequences


class OutputConfig:
    def __init__(
        self,
        return_log_probs: bool = False,
        return_context_logits: bool = False,
        return_generation_logits: bool = False,
        exclude_input_from_output: bool = False,
        return_encoder_output: bool = False,
        return_perf_metrics: bool = False,
    ) -> None:
        self.return_log_probs = return_log_probs
        self.return_context_logits = return_context_logits
        self.return_generation_logits = return_generation_logits
        self.exclude_input_from_output = exclude_input_from_output
        self.return_encoder_output = return_encoder_output
        self.return_perf_metrics = return_perf_metrics


class Request:
    def __init__(
        self,
        input_token_ids: list[int],
        max_tokens: int,
        *,
        streaming: bool = False,
        sampling_config: SamplingConfig | None = None,
        output_config: OutputConfig | None = None,
        end_id: int | None = None,
        pad_id: int | None = None,
        position_ids: list[int] | None = None,
        bad_words: list[list[int]] | None = None,
        stop_words: list[list[int]] | None = None,
        embedding_bias: Any = None,
        lora_config: Any = None,
        kv_cache_retention_config: Any = None,
        logits_post_processor_name: str | None = None,
        client_id: int | None = None,
        return_all_generated_tokens: bool = False,
        priority: float = 0.5,
    ) -> None:
        _check(
            isinstance(input_token_ids, list) and all(isinstance(t, int) for t in input_token_ids),
            "token ids",
        )
        _check(max_tokens >= 1, "maxTokens must be > 0")
        self.input_token_ids = list(input_token_ids)
        self.max_tokens = max_tokens
        self.streaming = streaming
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id, self.pad_id, self.position_ids = end_id, pad_id, position_ids
        self.bad_words, self.stop_words, self.embedding_bias = bad_words, stop_words, embedding_bias
        self.lora_config, self.kv_cache_retention_config = lora_config, kv_cache_retention_config
        self.logits_post_processor_name, self.client_id = logits_post_processor_name, client_id
        self.return_all_generated_tokens, self.priority = return_all_generated_tokens, priority


class KvCacheConfig:
    def __init__(
        self,
        enable_block_reuse: bool = True,
        max_tokens: int | None = None,
        max_attention_window: list[int] | None = None,
        sink_token_length: int | None = None,
        free_gpu_memory_fraction: float | None = None,
        host_cache_size: int | None = None,
        onboard_blocks: bool = True,
        cross_kv_cache_fraction: float | None = None,
        secondary_offload_min_priority: int | None = None,
        event_buffer_max_size: int = 0,
    ) -> None:
        _check(
            free_gpu_memory_fraction is None or 0.0 < free_gpu_memory_fraction <= 1.0, "freeGpuMemoryFraction"
        )
        self.enable_block_reuse, self.max_tokens = enable_block_reuse, max_tokens
        self.max_attention_window, self.sink_token_length = max_attention_window, sink_token_length
        self.free_gpu_memory_fraction, self.host_cache_size = free_gpu_memory_fraction, host_cache_size
        self.onboard_blocks, self.cross_kv_cache_fraction = onboard_blocks, cross_kv_cache_fraction
        self.secondary_offload_min_priority = secondary_offload_min_priority
        self.event_buffer_max_size = event_buffer_max_size


class SchedulerConfig:
    def __init__(
        self,
        capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
        context_chunking_policy: Any = None,
        dynamic_batch_config: Any = None,
    ) -> None:
        self.capacity_scheduler_policy = capacity_scheduler_policy
        self.context_chunking_policy = context_chunking_policy
        self.dynamic_batch_config = dynamic_batch_config


class ParallelConfig:
    def __init__(
        self,
        communication_type: CommunicationType = CommunicationType.MPI,
        communication_mode: CommunicationMode = CommunicationMode.LEADER,
        device_ids: list[int] | None = None,
        participant_ids: list[int] | None = None,
        orchestrator_config: Any = None,
        num_nodes: int | None = None,
    ) -> None:
        self.communication_type, self.communication_mode = communication_type, communication_mode
        self.device_ids, self.participant_ids = device_ids, participant_ids
        self.orchestrator_config, self.num_nodes = orchestrator_config, num_nodes


class ExecutorConfig:
    def __init__(
        self,
        max_beam_width: int = 1,
        scheduler_config: SchedulerConfig | None = None,
        kv_cache_config: KvCacheConfig | None = None,
        enable_chunked_context: bool = False,
        normalize_log_probs: bool = True,
        iter_stats_max_iterations: int = 1000,
        request_stats_max_iterations: int = 0,
        batching_type: BatchingType = BatchingType.INFLIGHT,
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        parallel_config: ParallelConfig | None = None,
    ) -> None:
        self.max_beam_width = max_beam_width
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.kv_cache_config = kv_cache_config or KvCacheConfig()
        self.enable_chunked_context, self.normalize_log_probs = enable_chunked_context, normalize_log_probs
        self.iter_stats_max_iterations = iter_stats_max_iterations
        self.request_stats_max_iterations = request_stats_max_iterations
        self.batching_type, self.max_batch_size, self.max_num_tokens = (
            batching_type,
            max_batch_size,
            max_num_tokens,
        )
        self.parallel_config = parallel_config


class Result:
    def __init__(self) -> None:
        self.is_final = False
        self.output_token_ids: list[list[int]] = [[]]
        self.cum_log_probs: list[float] | None = None
        self.log_probs: list[list[float]] | None = None
        self.context_logits = None
        self.generation_logits = None
        self.encoder_output = None
        self.finish_reasons: list[FinishReason] = [FinishReason.NOT_FINISHED]
        self.sequence_index = 0
        self.is_sequence_final = False
        self.decoding_iter = 0


class Response:
    def __init__(self, request_id: int, result: Result | None = None, error_msg: str | None = None) -> None:
        self._request_id, self._result, self._error = request_id, result, error_msg

    @property
    def request_id(self) -> int:
        return self._request_id

    def has_error(self) -> bool:
        return self._error is not None

    @property
    def error_msg(self) -> str:
        _check(self._error is not None, "Cannot get the error message of a response without error")
        return self._error or ""

    @property
    def result(self) -> Result:
        _check(self._result is not None, "Cannot get the result of a response with an error")
        assert self._result is not None
        return self._result


class KvCacheStats:
    def __init__(self, max_num_blocks: int, used_num_blocks: int, tokens_per_block: int) -> None:
        self.max_num_blocks = max_num_blocks
        self.free_num_blocks = max_num_blocks - used_num_blocks
        self.used_num_blocks = used_num_blocks
        self.tokens_per_block = tokens_per_block
        self.alloc_total_blocks = used_num_blocks
        self.alloc_new_blocks = 0
        self.reused_blocks = 0


class IterationStats:
    def __init__(self, **fields: Any) -> None:
        self.timestamp = time.strftime("%m-%d-%Y %H:%M:%S")
        self.iter = 0
        self.iter_latency_ms = 0.0
        self.num_active_requests = 0
        self.num_queued_requests = 0
        self.num_completed_requests = 0
        self.max_num_active_requests = 0
        self.gpu_mem_usage = self.cpu_mem_usage = self.pinned_mem_usage = 0
        self.kv_cache_stats: KvCacheStats | None = None
        self.__dict__.update(fields)

    def to_json_str(self) -> str:
        kv = self.kv_cache_stats
        return json.dumps(
            {
                "iter": self.iter,
                "iterLatencyMS": self.iter_latency_ms,
                "numActiveRequests": self.num_active_requests,
                "numQueuedRequests": self.num_queued_requests,
                "numCompletedRequests": self.num_completed_requests,
                "maxNumActiveRequests": self.max_num_active_requests,
                "timestamp": self.timestamp,
                "kvCacheStats": None
                if kv is None
                else {
                    "maxNumBlocks": kv.max_num_blocks,
                    "freeNumBlocks": kv.free_num_blocks,
                    "usedNumBlocks": kv.used_num_blocks,
                    "tokensPerBlock": kv.tokens_per_block,
                },
            }
        )


def token_logprob(token: int) -> float:
    return -(token % 7) / 8


def _mpi_rank() -> int:
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))


def _seconds(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


class _Active:
    def __init__(self, exec_id: int, request: Request) -> None:
        self.id = exec_id
        self.request = request
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.last = request.input_token_ids[-1]


class Executor:
    instances: list[Executor] = []  # every Executor built, for tests
    fail_construction: Exception | None = None
    end_token_in_output: bool = True
    step_s: float = 0.005

    def __init__(self, model_path: Any, model_type: ModelType, executor_config: ExecutorConfig) -> None:
        if Executor.fail_construction is not None:
            raise Executor.fail_construction
        _check(model_type == ModelType.DECODER_ONLY, "the double serves decoder-only engines")
        path = Path(model_path)
        self.rank = _mpi_rank()
        config = json.loads((path / "config.json").read_text())
        _check("version" in config, "engine config.json without version (legacy engines are not supported)")
        _check((path / f"rank{self.rank}.engine").is_file(), f"{path}/rank{self.rank}.engine: no such file")
        build, pretrained = config["build_config"], config["pretrained_config"]
        _check(
            executor_config.max_beam_width <= build.get("max_beam_width", 1),
            "maxBeamWidth exceeds the engine's",
        )
        self.model_path, self.config = path, executor_config
        self.vocab_size = int(pretrained["vocab_size"])
        self.max_input_len, self.max_seq_len = int(build["max_input_len"]), int(build["max_seq_len"])
        self.max_batch_size = min(
            executor_config.max_batch_size or build["max_batch_size"], build["max_batch_size"]
        )
        fraction = executor_config.kv_cache_config.free_gpu_memory_fraction or 0.9
        self.tokens_per_block = int(build.get("plugin_config", {}).get("tokens_per_block") or 32)
        self.max_num_blocks = int(fraction * 1000)
        self.requests: list[Request] = []
        self.cancelled: list[int] = []
        self.await_calls = 0
        self.shutdown_calls = 0
        self.fail_await: Exception | None = None
        self.fail_next_request: str | None = None
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._queued: deque[_Active] = deque()
        self._active: dict[int, _Active] = {}
        self._responses: list[Response] = []
        self._stats: deque[IterationStats] = deque(maxlen=executor_config.iter_stats_max_iterations or None)
        self._iter = 0
        self._held = False
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.rank == 0:
            self._thread = threading.Thread(target=self._loop, name="double-executor", daemon=True)
            self._thread.start()
        Executor.instances.append(self)

    # ------------------------------------------------------------ API

    def can_enqueue_requests(self) -> bool:
        return self.rank == 0 and not self._closed

    def enqueue_request(self, request: Request) -> int:
        _check(self.can_enqueue_requests(), "Cannot enqueue requests: not the leader or shut down")
        prompt = len(request.input_token_ids)
        _check(
            prompt <= self.max_input_len, f"input length {prompt} exceeds maxInputLen {self.max_input_len}"
        )
        _check(
            prompt + request.max_tokens <= self.max_seq_len,
            f"prompt {prompt} + maxTokens {request.max_tokens} exceeds maxSequenceLen {self.max_seq_len}",
        )
        with self._cond:
            exec_id = next(self._ids)
            self.requests.append(request)
            if self.fail_next_request is not None:
                self._responses.append(Response(exec_id, error_msg=self.fail_next_request))
                self.fail_next_request = None
            else:
                self._queued.append(_Active(exec_id, request))
            self._cond.notify_all()
            return exec_id

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        return [self.enqueue_request(r) for r in requests]

    def await_responses(self, timeout: Any = None) -> list[Response]:
        with self._cond:
            self.await_calls += 1
            if self.fail_await is not None:
                raise self.fail_await
            self._cond.wait_for(lambda: self._responses or self._closed, _seconds(timeout))
            out, self._responses = self._responses, []
            return out

    def get_num_responses_ready(self, id: int | None = None) -> int:
        with self._cond:
            return sum(1 for r in self._responses if id is None or r.request_id == id)

    def cancel_request(self, id: int) -> None:
        with self._cond:
            self.cancelled.append(id)
            found = self._active.pop(id, None)
            if found is None:
                found = next((q for q in self._queued if q.id == id), None)
                if found is not None:
                    self._queued.remove(found)
            if found is not None:
                self._respond(found, [], FinishReason.CANCELLED, final=True)
                self._cond.notify_all()

    def get_latest_iteration_stats(self) -> deque[IterationStats]:
        with self._cond:
            out, self._stats = self._stats, deque(maxlen=self._stats.maxlen)
            return out

    def shutdown(self) -> None:
        with self._cond:
            self.shutdown_calls += 1
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    # ------------------------------------------------------------ test controls

    def hold(self) -> None:
        with self._cond:
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def is_running_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ the fake in-flight batching loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or (not self._held and (self._queued or self._active))
                )
                if self._closed:
                    return
            time.sleep(self.step_s)  # one "iteration" of GPU time
            with self._cond:
                if not self._closed and not self._held:
                    self._iteration()
                    self._cond.notify_all()

    def _iteration(self) -> None:
        started = time.perf_counter()
        while self._queued and len(self._active) < self.max_batch_size:
            entry = self._queued.popleft()
            self._active[entry.id] = entry
        completed = 0
        for entry in list(self._active.values()):
            if self._step(entry):
                del self._active[entry.id]
                completed += 1
        self._iter += 1
        used = sum(
            -(-(len(e.request.input_token_ids) + len(e.tokens)) // self.tokens_per_block)
            for e in self._active.values()
        )
        self._stats.append(
            IterationStats(
                iter=self._iter,
                iter_latency_ms=(time.perf_counter() - started) * 1000,
                num_active_requests=len(self._active),
                num_queued_requests=len(self._queued),
                num_completed_requests=completed,
                max_num_active_requests=self.max_batch_size,
                kv_cache_stats=KvCacheStats(self.max_num_blocks, used, self.tokens_per_block),
            )
        )

    def _step(self, entry: _Active) -> bool:
        """One token for one request; True when it finished."""
        request = entry.request
        token = (entry.last + 1) % self.vocab_size
        entry.last = token
        stop = {w[0] for w in request.stop_words or [] if len(w) == 1}
        reason = None
        if request.end_id is not None and request.end_id >= 0 and token == request.end_id:
            reason = FinishReason.END_ID
        elif token in stop:
            reason = FinishReason.STOP_WORDS
        elif len(entry.tokens) + 1 >= request.max_tokens:
            reason = FinishReason.LENGTH
        new = [] if reason == FinishReason.END_ID and not self.end_token_in_output else [token]
        entry.tokens += new
        entry.logprobs += [token_logprob(t) for t in new]
        if request.streaming:
            self._respond(entry, new, reason or FinishReason.NOT_FINISHED, final=reason is not None)
        elif reason is not None:
            self._respond(entry, entry.tokens, reason, final=True)
        return reason is not None

    def _respond(self, entry: _Active, tokens: list[int], reason: FinishReason, *, final: bool) -> None:
        result = Result()
        result.output_token_ids = [list(tokens)]
        if entry.request.output_config.return_log_probs:
            # Streaming responses carry every logprob so far (as some TensorRT-LLM versions do).
            result.log_probs = [list(entry.logprobs)]
            result.cum_log_probs = [sum(entry.logprobs)]
        result.finish_reasons = [reason]
        result.is_final = result.is_sequence_final = final
        result.decoding_iter = len(entry.tokens)
        self._responses.append(Response(entry.id, result))
