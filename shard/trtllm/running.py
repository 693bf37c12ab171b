"""The requests rank 0 keeps in TensorRT-LLM: router id <-> TensorRT-LLM id, seeds, token counts.

Used by the engine's single calling thread only; the per-request token queues it reads live in the
ResponseBridge (responses.py), under the bridge's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shard.engine.base import EngineError, InvalidRequestError
from shard.engine.types import Generation, NewRequest
from shard.trtllm.limits import EngineLimits
from shard.trtllm.mapping import SpecialIds, build_request, check_request, stop_ids
from shard.trtllm.responses import ResponseBridge, TokenEvent, Track

log = logging.getLogger(__name__)


@dataclass
class _Running:
    exec_id: int  # TensorRT-LLM's request id
    seed: int
    generated: int  # tokens reported so far, including generated_before


@dataclass(frozen=True)
class Prepared:
    request: NewRequest
    trt_request: Any  # a tensorrt_llm.bindings.executor.Request
    track: Track


class RunningSet:
    def __init__(
        self, *, bridge: ResponseBridge, executor: Any, trtllm: Any, special: SpecialIds, limits: EngineLimits
    ) -> None:
        self._bridge = bridge
        self._executor = executor
        self._trtllm = trtllm
        self._special = special
        self._limits = limits
        self._runs: dict[int, _Running] = {}  # router id -> state, in arrival order

    def __len__(self) -> int:
        return len(self._runs)

    def ids(self) -> list[int]:
        return list(self._runs)

    def exec_id(self, rid: int) -> int | None:
        run = self._runs.get(rid)
        return None if run is None else run.exec_id

    def prepare(self, requests: Sequence[NewRequest]) -> list[Prepared]:
        """Validates and converts a whole batch before anything of it is enqueued."""
        seen: set[int] = set()
        batch = []
        for r in requests:
            if r.id in self._runs or r.id in seen:
                raise InvalidRequestError(f"request {r.id} is already running")
            seen.add(r.id)
            max_tokens = check_request(r, self._limits)
            track = Track(
                request_id=r.id,
                end_id=-1 if r.stopping.ignore_eos_token else self._special.end_id,
                eos_id=self._special.end_id,
                stop_ids=frozenset(stop_ids(r, self._special)),
                max_tokens=max_tokens,
            )
            batch.append(Prepared(r, build_request(self._trtllm, r, self._special, max_tokens), track))
        return batch

    def enqueue(self, batch: list[Prepared]) -> list[int]:
        """TensorRT-LLM ids, batch order; on a refusal the batch's enqueued requests are cancelled."""
        for p in batch:
            try:
                exec_id = self._bridge.enqueue(p.trt_request, p.track)
            except Exception as e:
                self.drop([q.request.id for q in batch], cancel=True)
                raise EngineError(
                    f"TensorRT-LLM refused request {p.request.id}: {type(e).__name__}: {e}"
                ) from e
            self._runs[p.request.id] = _Running(
                exec_id=exec_id, seed=p.request.sampling.seed, generated=p.request.generated_before
            )
        return [self._runs[p.request.id].exec_id for p in batch]

    def generations(self, rid: int, events: list[TokenEvent]) -> list[Generation]:
        """Generations for a request's new tokens; a finished request leaves the set."""
        run = self._runs[rid]
        out = []
        for event in events:
            run.generated += 1
            out.append(
                Generation(
                    request_id=rid,
                    token_id=event.token_id,
                    logprob=event.logprob,
                    generated_tokens=run.generated,
                    seed=run.seed,
                    finish_reason=event.finish,
                )
            )
            if event.finish is not None:
                self.drop([rid], cancel=False)  # finished in TensorRT-LLM: nothing to cancel
                break
        return out

    def drop(self, ids: Sequence[int], *, cancel: bool) -> None:
        """Forgets requests (unknown ids ignored); cancel=True cancels those TensorRT-LLM still runs."""
        for rid in ids:
            run = self._runs.pop(rid, None)
            if run is None:
                continue
            track = self._bridge.forget(run.exec_id)
            if cancel and track is not None and not track.finished:
                try:
                    self._executor.cancel_request(run.exec_id)
                except Exception:
                    log.exception("cancel_request(%d) failed", run.exec_id)
