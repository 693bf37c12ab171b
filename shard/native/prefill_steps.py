"""The native engine's Prefill: new requests' prompts, optionally in one forward with the running
set's next decode step (a mixed batch).

PrefillSteps is a mixin of NativeEngine (engine.py), split out to keep each file small. It relies on
these engine attributes: seqs, kv, mc, device, block_size, _orphans, _decode_batch, and on
_bind_device, _settle, _extend, _forward and _sample_and_step (decode_steps.py).

Why mixed batches: a prefill forward is compute-bound and a decode step memory-bound, so the
running set's step rides along in a prefill forward for little more than its FLOPs, instead of
stalling for the whole prefill and then paying a separate step's weight reads (vLLM's and
TensorRT-LLM's in-flight batching do the same). The decode rows come first in the flat batch, so
attention backends can give them the decode kernel (ForwardBatch.num_decode).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from shard.engine.base import InvalidRequestError
from shard.engine.types import Generation, NewRequest, StepResult, TopTokens
from shard.native.batch import build_prefill
from shard.native.decode_steps import SeqState
from shard.native.sampling_batch import make_generator


class PrefillSteps:
    """NativeEngine's Prefill (the engine attributes used: the module docstring)."""

    @torch.inference_mode()
    def prefill(
        self, requests: Sequence[NewRequest], *, decode_running: dict[int, Sequence[int]] | None = None
    ) -> StepResult:
        """decode_running (block extensions, as Decode's): the running set also takes one step in
        this forward. Its tokens come back in decode_generations, after any read from the step
        the last Decode carried (as that Decode's successor would return them)."""
        self._bind_device()
        if self.kv is None:
            raise InvalidRequestError("Prefill before Warmup")
        self._settle()
        running: list[SeqState] = []
        if decode_running is not None:
            self._extend(decode_running)
            running = list(self.seqs.values())
            for s in running:
                if len(s.blocks) * self.block_size <= s.kv_len:
                    raise InvalidRequestError(f"Prefill: running request {s.id} has no room for its next token")
        new = [self._admit(r) for r in requests]
        carried: list[Generation] = []
        if decode_running is not None:
            carried, self._orphans = self._orphans, []
        start = time.perf_counter_ns()
        if self._gaps is not None:
            self._gaps.not_a_decode()
            tokens = len(running) + sum(len(s.tokens) - r.prefix_len for s, r in zip(new, requests, strict=True))
            self._gaps.begin("prefill", tokens=tokens)
        batch = build_prefill(
            new_tokens=[s.tokens[-1:] for s in running] + [s.tokens[r.prefix_len :] for s, r in zip(new, requests, strict=True)],
            prefix_lens=[s.kv_len for s in running] + [r.prefix_len for r in requests],
            block_tables=[s.blocks for s in running] + [s.blocks for s in new],
            all_logits=[False] * len(running) + [r.prefill_logprobs for r in requests],
            block_size=self.block_size,
            device=self.device,
            num_decode=len(running),
        )
        logits = self._forward(batch)  # (L, V) float32; None before the last pipeline stage
        # Logits rows: one per decode row, then the last row of each new sequence (all its rows
        # with prompt logprobs).
        rows, prompt_logprobs, offset = list(range(len(running))), [], len(running)
        for s, r in zip(new, requests, strict=True):
            n = len(s.tokens) - r.prefix_len if r.prefill_logprobs else 1
            if r.prefill_logprobs and logits is not None:
                prompt_logprobs.append(_prompt_logprobs(logits[offset : offset + n], s.tokens))
            else:
                prompt_logprobs.append(None)
            offset += n
            rows.append(offset - 1)
        for s in running:
            s.kv_len += 1  # this forward wrote its pending token's K/V
        for s in new:
            s.kv_len = len(s.tokens)
            self.seqs[s.id] = s
        last_rows = None if logits is None else logits[torch.tensor(rows, device=logits.device)]
        gens = self._sample_and_step([*running, *new], last_rows)  # one generation per row, row order
        forward_ns = time.perf_counter_ns() - start
        firsts = [
            g if p is None else replace(g, prefill_tokens=p)
            for g, p in zip(gens[len(running) :], prompt_logprobs, strict=True)
        ]
        self._decode_batch = None  # the running set changed
        return StepResult(
            generations=firsts, steps=1, forward_ns=forward_ns, decode_generations=carried + gens[: len(running)]
        )

    def _admit(self, r: NewRequest) -> SeqState:
        if r.id in self.seqs:
            raise InvalidRequestError(f"Prefill: request id {r.id} is already running")
        if not r.input_ids:
            raise InvalidRequestError(f"Prefill: request {r.id} has no input tokens")
        need = math.ceil((len(r.input_ids) + 1) / self.block_size)
        if len(r.blocks) < need:
            raise InvalidRequestError(
                f"Prefill: request {r.id} has {len(r.blocks)} blocks, needs {need} for {len(r.input_ids)} tokens"
            )
        if r.prefix_len % self.block_size or r.prefix_len >= len(r.input_ids):
            raise InvalidRequestError(f"Prefill: request {r.id} has an invalid prefix_len {r.prefix_len}")
        assert self.kv is not None
        if max(r.blocks) >= self.kv.num_blocks - 1:
            raise InvalidRequestError(f"Prefill: request {r.id} names a block beyond the cache")
        stop_ids = frozenset() if r.stopping.ignore_eos_token else frozenset(
            (*self.mc.eos_token_ids, *r.stopping.stop_token_ids)
        )
        return SeqState(
            id=r.id,
            tokens=list(r.input_ids),
            blocks=list(r.blocks),
            kv_len=r.prefix_len,
            sampling=r.sampling,
            stopping=r.stopping,
            top_n=r.top_n_tokens,
            generated=r.generated_before,
            generator=make_generator(r.sampling.seed, self.device) if r.sampling.do_sample else None,
            stop_ids=stop_ids,
        )


def _prompt_logprobs(logits: torch.Tensor, tokens: list[int]) -> TopTokens:
    """Logprob of each prompt token given the ones before it (NaN for the first)."""
    n = logits.shape[0]  # one row per prompt token
    targets = torch.tensor(tokens[1:n], device=logits.device)
    lp = torch.log_softmax(logits[: n - 1].float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return TopTokens(ids=tuple(tokens[:n]), logprobs=(float("nan"), *lp.tolist()))
