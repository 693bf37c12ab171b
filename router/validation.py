"""TGI's request validation: parameter rules, tokenization, length limits (router/src/validation.rs).

Both APIs land here: the TGI routes fill Params from their body, the OpenAI routes map theirs onto
Params first. The result is a router.types.GenerateRequest plus what the HTTP layer needs to
shape the response. Messages are TGI's, word for word, so clients matching on them keep working.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import random
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from router import metrics
from router.arrivals import Arrivals
from router.batch_encoder import BatchEncoder
from router.errors import UnhealthyError, ValidationError
from router.types import GenerateRequest, Limits, SamplingParams

if TYPE_CHECKING:
    from router.tokenizer import Tokenizer

U64_MAX = 2**64 - 1
R = TypeVar("R")


class TemplateError(ValidationError):
    """The chat template rejected the conversation (TGI's error_type)."""

    error_type = "template_error"


@dataclass(frozen=True)
class Params:
    """Generation parameters as the client gave them (None = not given), API-neutral."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    seed: int | None = None
    top_n_tokens: int | None = None
    decoder_input_details: bool = False
    ignore_eos_token: bool = False
    watermark: bool = False
    grammar: bool = False  # a grammar was given
    adapter_id: str | None = None


@dataclass(frozen=True)
class ValidRequest:
    request: GenerateRequest  # seed already drawn when sampling
    input_length: int
    stop: tuple[str, ...]
    best_of: int
    sampling: bool  # details.seed is reported only when sampling (TGI: greedy -> null)
    decoder_input_details: bool
    validation_time: float  # seconds spent here (x-validation-time)

    @property
    def seed(self) -> int | None:
        return self.request.sampling.seed if self.sampling else None

    def with_seed(self, seed: int) -> ValidRequest:
        sampling = dataclasses.replace(self.request.sampling, seed=seed)
        return dataclasses.replace(self, request=dataclasses.replace(self.request, sampling=sampling))


# Sampling seeds need no cryptographic strength (TGI draws them from a thread-local PRNG): one
# generator seeded from the OS at start-up, instead of an os.urandom call per request (secrets).
_SEEDS = random.Random(secrets.randbits(64))


def random_seed() -> int:
    return _SEEDS.getrandbits(64)


def _check_range(p: Params, limits: Limits, *, stream: bool) -> None:
    """Parameter rules in TGI's order (each raises TGI's message)."""
    best_of = 1 if p.best_of is None else p.best_of
    if best_of != 1:
        if limits.max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of <= 0 or best_of > limits.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if p.decoder_input_details and stream:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    if best_of > 1 and not sampling:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    if p.temperature is not None and p.temperature <= 0.0:
        raise ValidationError("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0.0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and "typical_p" in limits.unsupported_parameters:
        raise ValidationError("`typical_p` is not supported by this server's engine")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
        )
    if p.seed is not None:
        if best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        if not 0 <= p.seed <= U64_MAX:
            raise ValidationError(f"`seed` must be >= 0 and <= {U64_MAX}. Given: {p.seed}")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= limits.max_top_n_tokens:
        raise ValidationError(
            f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {p.top_n_tokens}"
        )


def _check_unsupported(p: Params, *, prefill_logprobs_supported: bool) -> None:
    if p.watermark:
        raise ValidationError("`watermark` is not supported by this server")
    if p.grammar:
        raise ValidationError("grammar is not supported")
    if p.adapter_id:
        raise ValidationError("`adapter_id` is not supported by this server (no LoRA adapters)")
    if p.decoder_input_details and not prefill_logprobs_supported:
        raise ValidationError("`decoder_input_details` is not supported by this engine")


def _effective_sampling(p: Params) -> bool:
    """Whether the shard samples. TGI's server samples when do_sample is set or any warper is
    active (a temperature of exactly 1.0 alone changes nothing, so greedy stays greedy)."""
    return (
        p.do_sample
        or (p.temperature is not None and p.temperature != 1.0)
        or (p.top_k is not None and p.top_k > 0)
        or (p.top_p is not None and p.top_p < 1.0)
        or (p.typical_p is not None and p.typical_p < 1.0)
    )


def build_request(
    p: Params,
    input_ids: list[int],
    limits: Limits,
    *,
    stop_token_ids: tuple[int, ...] = (),
    vocab_size: int | None = None,
) -> tuple[GenerateRequest, int]:
    """Length rules on already tokenized (and truncated) input. Returns the request and
    max_new_tokens. A top_k beyond the vocabulary keeps every token, exactly like top_k =
    vocab_size, so it is clamped (the wire field is 32-bit)."""
    input_length = len(input_ids)
    if p.max_new_tokens is None:
        # TGI 3: the longest generation the token budget allows.
        max_new_tokens = max(limits.max_total_tokens - input_length, 0)
    else:
        max_new_tokens = p.max_new_tokens
    if input_length + max_new_tokens > limits.max_total_tokens or max_new_tokens == 0:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    if input_length > limits.max_input_tokens:
        raise ValidationError(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}"
        )
    sampling = SamplingParams(
        temperature=1.0 if p.temperature is None else p.temperature,
        top_k=min(p.top_k or 0, vocab_size) if vocab_size else (p.top_k or 0),
        top_p=1.0 if p.top_p is None else p.top_p,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        do_sample=_effective_sampling(p),
        seed=p.seed if p.seed is not None else random_seed(),
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
    )
    request = GenerateRequest(
        input_ids=tuple(input_ids),
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        ignore_eos_token=p.ignore_eos_token,
        stop_token_ids=stop_token_ids,
        top_n_tokens=p.top_n_tokens or 0,
        prefill_logprobs=p.decoder_input_details,
    )
    return request, max_new_tokens


class Validator:
    """Validates and tokenizes requests. Tokenization runs in a small thread pool (the Rust
    tokenizer releases the GIL), so a long prompt does not stall the event loop; prompts that
    arrive together are encoded together (router/batch_encoder.py). `arrivals` counts the requests
    being validated (router/arrivals.py: what the scheduler of an idle server may wait for)."""

    def __init__(self, *, workers: int = 2, arrivals: Arrivals | None = None) -> None:
        self.workers = workers
        self.arrivals = arrivals if arrivals is not None else Arrivals()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
        self._encoder = BatchEncoder(self._pool)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """fn(*args, **kwargs) in the tokenizer pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def validate(
        self,
        inputs: str,
        p: Params,
        *,
        tokenizer: Tokenizer | None,
        limits: Limits | None,
        prefill_logprobs_supported: bool,
        stream: bool,
        add_special_tokens: bool = True,
        stop_token_ids: tuple[int, ...] = (),
    ) -> ValidRequest:
        with self.arrivals.track():  # the scheduler of an idle server may wait for it (arrivals.py)
            return await self._validate(inputs, p, tokenizer, limits, prefill_logprobs_supported, stream,
                                        add_special_tokens, stop_token_ids)  # fmt: skip

    async def _validate(
        self, inputs: str, p: Params, tokenizer: Tokenizer | None, limits: Limits | None,
        prefill_logprobs_supported: bool, stream: bool, add_special_tokens: bool, stop_token_ids: tuple[int, ...],
    ) -> ValidRequest:  # fmt: skip
        start = time.monotonic()
        if tokenizer is None or limits is None:
            raise UnhealthyError("the model is not ready yet")
        _check_range(p, limits, stream=stream)
        _check_unsupported(p, prefill_logprobs_supported=prefill_logprobs_supported)
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
                f"Given: {p.truncate}"
            )
        input_ids = await self._encoder.encode(
            tokenizer, inputs, add_special_tokens=add_special_tokens, truncate=p.truncate
        )
        if not input_ids:
            raise ValidationError("`inputs` cannot be empty")
        request, max_new_tokens = build_request(
            p, input_ids, limits, stop_token_ids=stop_token_ids, vocab_size=tokenizer.vocab_size
        )
        metrics.REQUEST_INPUT_LENGTH.observe(len(input_ids))
        metrics.REQUEST_MAX_NEW_TOKENS.observe(max_new_tokens)
        elapsed = time.monotonic() - start
        metrics.REQUEST_VALIDATION_DURATION.observe(elapsed)
        return ValidRequest(
            request=request,
            input_length=len(input_ids),
            stop=p.stop,
            best_of=p.best_of or 1,
            sampling=request.sampling.do_sample,
            decoder_input_details=p.decoder_input_details,
            validation_time=elapsed,
        )


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN/inf: TGI reports an undefined logprob (the first prompt token) as null."""
    return x if math.isfinite(x) else None
