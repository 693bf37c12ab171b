"""From the scheduler's TokenOut stream to text: detokenization, stop strings, token objects and
the final outcome (generated text, finish reason, details), shared by the TGI and OpenAI routes.

Text contract: each step's `token.text` is the text released at that step -- possibly "" while a
character is incomplete or while text that may start a stop string is held back; special tokens
(EOS, end-of-turn) add no text. Hence the concatenation of all `token.text` of a stream equals
the final `generated_text` exactly, and `special` is true only for a step whose text is "" and
whose token is special (so "skip special tokens" clients see the same text). TGI puts the special
token's literal text (e.g. "</s>") there instead; we don't, so that both ways of joining agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from router import metrics
from router.detokenizer import IncrementalDetokenizer
from router.errors import GenerationError
from router.stop import StopMatcher
from router.types import FinishReason, RequestTimes, TokenOut
from router.validation import ValidRequest, finite_or_none

if TYPE_CHECKING:
    from router.scheduler import RequestHandle, Scheduler
    from router.tokenizer import Tokenizer

T = TypeVar("T")


class IncompleteGenerationError(GenerationError):
    """The token stream ended without a finish reason (TGI: 500, incomplete_generation)."""

    status_code = 500
    error_type = "incomplete_generation"


@dataclass(slots=True)  # per token: slots, not frozen (cheaper to build)
class OutToken:
    id: int
    text: str
    logprob: float | None
    special: bool


@dataclass(frozen=True)
class PrefillToken:
    id: int
    text: str
    logprob: float | None


@dataclass
class Outcome:
    """One finished generation."""

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int
    tokens: list[OutToken]
    top_tokens: list[list[OutToken]]
    prefill: list[PrefillToken]
    times: RequestTimes
    validation_time: float
    finished_at: float  # time.monotonic()

    @property
    def mean_logprob(self) -> float:
        """TGI's best_of criterion: the mean logprob of the generated tokens."""
        lps = [t.logprob if t.logprob is not None else float("-inf") for t in self.tokens]
        return sum(lps) / len(lps) if lps else float("-inf")


@dataclass(slots=True)  # per token: slots, not frozen (cheaper to build)
class Step:
    index: int  # 1-based token position
    token: OutToken
    top_tokens: list[OutToken]
    outcome: Outcome | None = None  # set on the last step only


class TextAssembler:
    """Detokenizer + stop matcher for one sequence."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True)
        self._stop = StopMatcher(stop)
        self.matched: str | None = None

    def push(self, token_id: int) -> str:
        result = self._stop.push(self._detok.add(token_id))
        if result.matched is not None:
            self.matched = result.matched
        return result.text

    def finish(self) -> str:
        """Remaining text at the end: incomplete characters, then held-back text."""
        if self.matched is not None:
            return ""
        result = self._stop.push(self._detok.flush())
        if result.matched is not None:
            self.matched = result.matched
            return result.text
        return result.text + self._stop.flush()


@dataclass
class Generation:
    """Consumes one RequestHandle. steps() yields a Step per token; the last one carries the
    Outcome. Leaving early (client gone, error, stop string) cancels the handle."""

    handle: RequestHandle
    valid: ValidRequest
    tokenizer: Tokenizer
    finished: bool = False
    _tokens: list[OutToken] = field(default_factory=list)
    _top: list[list[OutToken]] = field(default_factory=list)

    @property
    def more_ready(self) -> bool:
        """The next step is already here (see RequestHandle.pending)."""
        return self.handle.pending

    def close(self) -> None:
        """Cancel the handle unless the generation finished (safe to call any number of times,
        also when steps() never started)."""
        if not self.finished:
            self.handle.cancel()

    def _top_tokens(self, tok: TokenOut) -> list[OutToken]:
        if not tok.top_ids:  # the common case, per token: no comprehension to set up
            return []
        return [
            OutToken(i, self.tokenizer.token_text(i), finite_or_none(lp), self.tokenizer.is_special(i))
            for i, lp in zip(tok.top_ids, tok.top_logprobs, strict=False)
        ]

    def _prefill(self) -> list[PrefillToken]:
        pre = self.handle.prefill
        if not self.valid.decoder_input_details or pre is None:
            return []
        return [
            PrefillToken(i, self.tokenizer.token_text(i), finite_or_none(lp))
            for i, lp in zip(pre.ids, pre.logprobs, strict=False)
        ]

    async def steps(self) -> AsyncIterator[Step]:
        text = TextAssembler(self.tokenizer, self.valid.request.input_ids, self.valid.stop)
        try:
            async for tok in self.handle:
                released = text.push(tok.id)
                finish = tok.finish_reason
                if text.matched is not None:
                    finish = FinishReason.STOP_SEQUENCE
                    self.handle.cancel()  # the shard may still be generating: free its slot now
                if finish is not None:
                    released += text.finish()
                special = self.tokenizer.is_special(tok.id) and released == ""
                token = OutToken(tok.id, released, finite_or_none(tok.logprob), special)
                top = self._top_tokens(tok)
                self._tokens.append(token)
                self._top.append(top)
                index = len(self._tokens)
                if finish is None:
                    yield Step(index, token, top)
                    continue
                self.finished = True
                yield Step(index, token, top, outcome=self._outcome(finish))
                return
            raise IncompleteGenerationError("Incomplete generation")
        finally:
            self.close()

    def _outcome(self, finish: FinishReason) -> Outcome:
        return Outcome(
            generated_text="".join(t.text for t in self._tokens),
            finish_reason=finish,
            generated_tokens=len(self._tokens),
            seed=self.valid.seed,
            input_length=self.valid.input_length,
            tokens=self._tokens,
            top_tokens=self._top,
            prefill=self._prefill(),
            times=self.handle.times,
            validation_time=self.valid.validation_time,
            finished_at=time.monotonic(),
        )


def submit(scheduler: Scheduler, valid: ValidRequest, tokenizer: Tokenizer) -> Generation:
    return Generation(scheduler.submit(valid.request), valid, tokenizer)


async def run_to_end(gen: Generation) -> Outcome:
    async with contextlib.aclosing(gen.steps()) as steps:
        async for step in steps:
            if step.outcome is not None:
                return step.outcome
    raise IncompleteGenerationError("Incomplete generation")  # steps() raises first; kept for typing


def submit_many(
    scheduler: Scheduler, valids: Sequence[ValidRequest], tokenizer: Tokenizer
) -> list[Generation]:
    """Submit all or none: if one submit is refused (429), the ones already queued are cancelled."""
    gens: list[Generation] = []
    try:
        for v in valids:
            gens.append(submit(scheduler, v, tokenizer))
    except BaseException:
        for g in gens:
            g.handle.cancel()
        raise
    return gens


async def gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """asyncio.gather that cancels the siblings when one fails (TaskGroup needs Python 3.11)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merge_steps(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, Step]]:
    """Interleave several generations' steps as they come: (generation index, step)."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0].steps()) as steps:
            async for step in steps:
                yield 0, step
        return
    queue: asyncio.Queue[tuple[int, Step | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async with contextlib.aclosing(gen.steps()) as steps:
                async for step in steps:
                    await queue.put((i, step, None))
            await queue.put((i, None, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which re-raises it
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, step, error = await queue.get()
            if error is not None:
                raise error
            if step is None:
                remaining -= 1
                continue
            yield i, step
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class Timings:
    """TGI's per-request timings (seconds)."""

    total: float
    validation: float
    queue: float
    inference: float
    per_token: float


def timings(outcome: Outcome, started_at: float) -> Timings:
    """started_at: time.monotonic() when the HTTP handler began."""
    t = outcome.times
    start = t.started if t.started is not None else t.queued
    inference = max(outcome.finished_at - start, 0.0)
    return Timings(
        total=max(outcome.finished_at - started_at, 0.0),
        validation=outcome.validation_time,
        queue=max(start - t.queued, 0.0),
        inference=inference,
        per_token=inference / max(outcome.generated_tokens, 1),
    )


def record_success(outcome: Outcome, started_at: float) -> Timings:
    tm = timings(outcome, started_at)
    metrics.REQUEST_SUCCESS.inc()
    metrics.REQUEST_DURATION.observe(tm.total)
    metrics.REQUEST_QUEUE_DURATION.observe(tm.queue)
    metrics.REQUEST_INFERENCE_DURATION.observe(tm.inference)
    metrics.REQUEST_MEAN_TIME_PER_TOKEN.observe(tm.per_token)
    metrics.REQUEST_GENERATED_TOKENS.observe(outcome.generated_tokens)
    return tm
