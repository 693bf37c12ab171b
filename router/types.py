"""Typed contract between the router's HTTP layer and its scheduler.

The HTTP layer validates and tokenizes a request into a GenerateRequest, submits it to the
Scheduler, and receives TokenOut items from the RequestHandle. Text (detokenization, stop strings)
is the HTTP layer's business (router/stream.py); the scheduler deals in token ids only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    typical_p: float = 1.0  # 1.0 = off
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class GenerateRequest:
    """A validated, tokenized request. Invariant: 0 < len(input_ids) and
    len(input_ids) + max_new_tokens <= the router's max_total_tokens."""

    input_ids: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    ignore_eos_token: bool = False
    stop_token_ids: tuple[int, ...] = ()  # extra EOS-like ids (chat end-of-turn)
    top_n_tokens: int = 0
    prefill_logprobs: bool = False  # TGI decoder_input_details


@dataclass(slots=True)  # built per token: slots, not frozen (frozen __init__ costs 4x)
class TokenOut:
    """One generated token as the shard returned it."""

    id: int
    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    finish_reason: FinishReason | None = None  # LENGTH or EOS_TOKEN from the shard


@dataclass(frozen=True)
class PrefillOut:
    """Prompt tokens with their logprobs (NaN for the first), when prefill_logprobs was asked."""

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass
class RequestTimes:
    """Monotonic timestamps (time.monotonic()) the HTTP layer reports in headers and metrics."""

    queued: float
    started: float | None = None  # first Prefill sent
    first_token: float | None = None
    finished: float | None = None


@dataclass(frozen=True)
class ShardInfo:
    """Router-side copy of the shard's InfoResponse plus the Warmup result."""

    model_id: str
    dtype: str
    device_type: str
    world_size: int
    tp_size: int
    pp_size: int
    engine: str  # "native" | "trtllm"
    block_size: int
    manages_kv_cache: bool
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_batch_size: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    supports_prefix_caching: bool
    supports_prefill_logprobs: bool
    max_top_n_tokens: int
    engine_version: str = ""
    unsupported_parameters: tuple[str, ...] = ()
    supports_mixed_batches: bool = False  # Prefill can carry the running batch's decode step
    num_blocks: int = 0
    max_supported_total_tokens: int = 0
    urls: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Limits:
    """The limits validation enforces: the router's flags, capped by what the shard reported."""

    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_client_batch_size: int
    max_concurrent_requests: int
    unsupported_parameters: tuple[str, ...] = ()  # the engine cannot honour these: 422 when set
