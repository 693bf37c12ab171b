"""Typed contract between the shard's gRPC layer and its engines.

The gRPC servicer converts protobuf messages into these dataclasses and back; engines never see
protobuf. Token ids are plain ints; tensors never cross this boundary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EngineKind(enum.Enum):
    NATIVE = "native"
    TRTLLM = "trtllm"


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    typical_p: float = 1.0  # 1.0 = off
    do_sample: bool = False  # False = greedy (argmax after penalties)
    seed: int = 0
    repetition_penalty: float = 1.0  # 1.0 = off
    frequency_penalty: float = 0.0  # 0.0 = off

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    ignore_eos_token: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class NewRequest:
    """One request entering the running set (Prefill).

    Invariants (checked by the router, asserted by engines): prefix_len % block_size == 0,
    prefix_len < len(input_ids), and `blocks` covers len(input_ids) + 1 tokens for paged engines.
    """

    id: int
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    blocks: tuple[int, ...] = ()
    prefix_len: int = 0
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    generated_before: int = 0  # tokens generated before a preemption; count toward the limits


@dataclass(frozen=True)
class TopTokens:
    ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Generation:
    """One new token of one request."""

    request_id: int
    token_id: int
    logprob: float
    generated_tokens: int  # including this token and generated_before
    seed: int
    finish_reason: FinishReason | None = None
    top_tokens: TopTokens = field(default_factory=TopTokens)
    # Prefill only, when prefill_logprobs was asked: the prompt's ids and logprobs (NaN for the first).
    prefill_tokens: TopTokens | None = None


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    dtype: str
    device_type: str
    world_size: int
    tp_size: int
    pp_size: int
    engine: EngineKind
    block_size: int
    manages_kv_cache: bool
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_batch_size: int = 0  # 0 = no limit of the engine's own
    max_input_tokens: int = 0
    max_total_tokens: int = 0
    max_batch_prefill_tokens: int = 0
    max_beam_width: int = 1
    supports_prefix_caching: bool = True
    supports_prefill_logprobs: bool = True
    max_top_n_tokens: int = 10
    engine_version: str = ""
    unsupported_parameters: tuple[str, ...] = ()  # request parameters the router must reject
    supports_mixed_batches: bool = False  # Engine.prefill accepts decode_running (base.py)


@dataclass(frozen=True)
class WarmupSpec:
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int


@dataclass(frozen=True)
class WarmupResult:
    num_blocks: int
    block_size: int
    max_supported_total_tokens: int


@dataclass(frozen=True)
class StepResult:
    generations: list[Generation]
    steps: int
    forward_ns: int = 0
    # Prefill with decode_running: the running set's tokens (Decode's order: carried step first).
    decode_generations: list[Generation] = field(default_factory=list)
