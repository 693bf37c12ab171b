"""The native engine's decode steps: sampling, the tokens' way to the host, and the per-sequence
host state, with the host optionally one step behind the device (DecodeSteps._decode_overlapped).

DecodeSteps is a mixin of NativeEngine (engine.py), split out to keep each file small. It relies on
these engine attributes: seqs (id -> SeqState, the running set), mc (ModelConfig), device,
block_size, world_size, sampler, _graphs (GraphedDecode | None), _overlap, _gaps / _step_kind
(gpu_gaps.py), and the per-running-set caches _decode_batch / _decode_rows / _sampling_batch
(None = rebuild), and on _forward(batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shard.engine.base import InvalidRequestError
from shard.engine.types import (
    FinishReason,
    Generation,
    SamplingParams,
    StoppingParams,
    TopTokens,
)
from shard.native.batch import DecodeBatch
from shard.native.sampler import HostCopy, SampleOutput
from shard.native.sampling_batch import SamplingBatch, SamplingRow

# Spare block-table columns of a rebuilt decode batch: block extensions (each Decode grows a
# sequence by at most max_steps + 1 tokens) fit in place until the next rebuild.
TABLE_HEADROOM = 8


@dataclass(eq=False)
class SeqState:
    """Invariant: the cache holds K/V of tokens[:kv_len]; tokens[-1] is pending once generated."""

    id: int
    tokens: list[int]
    blocks: list[int]
    kv_len: int
    sampling: SamplingParams
    stopping: StoppingParams
    top_n: int
    generated: int  # including generated_before
    generator: torch.Generator | None
    stop_ids: frozenset[int] = field(default_factory=frozenset)

    def finish_reason(self, token: int) -> FinishReason | None:
        if token in self.stop_ids:
            return FinishReason.EOS_TOKEN
        if self.generated >= self.stopping.max_new_tokens:
            return FinishReason.LENGTH
        return None


@dataclass(eq=False)
class LaunchedStep:
    """A sampling step queued on the device whose tokens the host has not read yet."""

    seqs: list[SeqState]  # row order
    ids: torch.Tensor  # (B,) int64 on the device: feeds the next step
    host: HostCopy


class DecodeSteps:
    """NativeEngine's decode and sampling steps (the engine attributes used: the module docstring)."""

    def _decode_overlapped(self, max_steps: int) -> tuple[list[Generation], int]:
        """Multi-step decode with the host one step behind the device: step k+1 is launched
        before step k's tokens are read back, so the host's per-step work (reading tokens, building
        Generations) runs while the GPU computes instead of between steps. Returns max_steps
        tokens per sequence (fewer when sequences end).

        Carried step: the call's last launched step stays in flight when the call returns
        (_carried), so the GPU computes through the RPC turn-around (the router's work and the
        next Decode on its way); the next call returns its tokens first. Block extensions go into
        the device batch around it (_extend_in_flight); anything else that needs the host state
        first reads it (_settle): its tokens wait in _orphans for the next Decode. The router grows
        every sequence by max_steps + 1 K/V slots (kv_planner.grow), which covers the carried
        step's; a call carries whenever every row has that slot (_can_carry).

        Ended sequences: step k+1 is launched before anyone knows whether a sequence ended at step
        k, so a sequence that ends rides along for one step: it stays a row of the device batch,
        its K/V goes to its own blocks, its token is dropped. The next launch drops it from the
        device batch by a gather on the device (_compact): the host state may be a step behind,
        and a step may be in flight. A call therefore runs its max_steps, and carries, whether or
        not somebody ended in it. (Before the gather, an ended sequence rode to the end of the call
        and a call where somebody ended did not carry: the next call rebuilt the batch on the host
        while the GPU sat idle -- 25-30 ms per such call at batch 512 on an H100.)"""
        out, self._orphans = self._orphans, []
        pending, self._carried = self._carried, None
        returned = 1 if out else 0  # steps whose tokens are in `out`; orphans come first
        while self.seqs:
            if returned + (pending is not None) >= max_steps:  # pending completes the call
                launched = self._launch_step() if self._can_carry() else None
                if pending is not None:
                    out.extend(self._finish_step(pending, rebuild=False))
                    returned += 1
                pending = None
                self._carried = launched
                break
            launched = self._launch_step()
            if pending is not None:
                out.extend(self._finish_step(pending, rebuild=False))
                returned += 1
            pending = launched
        if pending is not None:
            out.extend(self._finish_step(pending, rebuild=False))
            returned += 1
        return out, returned

    def _extend_in_flight(self, extensions: dict[int, Sequence[int]]) -> bool:
        """Block extensions without stopping the device: when every extended request is a row of
        the current device batch (nobody left it) and the longer lists fit its block table, they
        are written into it in place, and a carried step stays in flight. Otherwise nothing changes
        and the caller settles and rebuilds (_settle, _extend). Under load most Decode calls carry
        an extension (some row crosses a block boundary); settling and rebuilding the batch for
        each of them left the GPU idle while the host rebuilt the batch."""
        db = self._decode_batch
        if db is None or self._orphans or len(self._decode_rows) != len(self.seqs):
            return False
        row_of = {s.id: i for i, s in enumerate(self._decode_rows)}
        rows, tables = [], []
        for rid, blocks in extensions.items():
            seq, row = self.seqs.get(rid), row_of.get(rid)
            if seq is None or row is None or self._decode_rows[row] is not seq:
                return False
            rows.append(row)
            tables.append([*seq.blocks, *blocks])
        if not db.set_block_rows(rows, tables):
            return False
        for rid, blocks in extensions.items():
            self.seqs[rid].blocks.extend(blocks)
        return True

    def _settle(self) -> None:
        """Reads the carried step (if any) into the host state, its tokens kept for the next Decode:
        anything that changes the running set or rebuilds the batch needs the host state current."""
        if self._carried is not None:
            step, self._carried = self._carried, None
            self._orphans.extend(self._finish_step(step, rebuild=False))
            if len(self._decode_rows) != len(self.seqs):
                self._decode_batch = None

    def _can_carry(self) -> bool:
        """Every row of the next launch has a slot for its K/V: the running sequences, and those
        that ended in the step in flight (not known yet, they ride along)."""
        if self._decode_batch is None:  # the next launch rebuilds the batch from every sequence
            rows = list(self.seqs.values())
        else:  # the next launch drops the rows known to have ended (_compact)
            rows = [s for s in self._decode_rows if self.seqs.get(s.id) is s]
        return all(len(s.blocks) * self.block_size > s.kv_len for s in rows)

    def _compact(self) -> None:
        """Drops the rows whose sequence has ended (or left) from the device batch and its sampling
        batch, by a gather on the device: no host sync, a step in flight stays in flight. The
        running set must be a subset of the rows (anything that adds a sequence rebuilds)."""
        db, rows = self._decode_batch, self._decode_rows
        if db is None or len(rows) == len(self.seqs):
            return
        keep = [i for i, s in enumerate(rows) if self.seqs.get(s.id) is s]
        if len(keep) != len(self.seqs):
            raise RuntimeError("running sequences missing from the decode batch (a rebuild was skipped)")
        kept = [rows[i] for i in keep]
        self._decode_batch = db.select(keep, max_kv=max((s.kv_len for s in kept), default=0))
        self._decode_rows = kept
        if self._sampling_batch is not None:
            self._sampling_batch = self._sampling_batch.select(keep)

    def _launch_step(self) -> LaunchedStep:
        """Queues one decode step (forward, sampling, the tokens' copy to the host) without waiting
        for it, and advances the device-side batch. Host state (tokens, counts) waits for
        _finish_step; kv_len counts the K/V this step writes."""
        if self._gaps is not None:
            kind = self._step_kind
            if kind == "call" and self._decode_batch is None:
                kind = "call, rebuilt"  # the batch is built on the host first (the GPU may be idle)
            self._gaps.begin(kind)
            self._step_kind = "step"
        self._compact()
        if self._decode_batch is None:
            rows = list(self.seqs.values())
            self._decode_rows = rows
            self._sampling_batch = None
            # Spare columns let later block extensions be written in place (_extend_in_flight),
            # within what the captured graphs' block table holds.
            width = max(len(s.blocks) for s in rows)
            cap = self._graphs.max_blocks_per_seq if self._graphs is not None else width + TABLE_HEADROOM
            self._decode_batch = DecodeBatch(
                last_tokens=[s.tokens[-1] for s in rows],
                kv_lens=[s.kv_len for s in rows],
                block_tables=[s.blocks for s in rows],
                block_size=self.block_size,
                device=self.device,
                width=min(width + TABLE_HEADROOM, max(cap, width)),
            )
        db = self._decode_batch
        seqs = self._decode_rows  # rows that ended in the step in flight ride along (_decode_overlapped)
        for s in seqs:  # a sequence may outgrow its blocks within a multi-step call
            if len(s.blocks) * self.block_size <= s.kv_len:
                raise InvalidRequestError(f"Decode: request {s.id} has no room for its next token")
        batch = db.forward_batch()
        if self._graphs is not None and self._graphs.supports(batch):
            logits = self._graphs(batch)
        else:
            logits = self._forward(batch)
        for s in seqs:
            s.kv_len += 1
        if self._sampling_batch is None:
            self._sampling_batch = self._sampling_batch_for(seqs)
        launched = self._sample_launch(seqs, logits, self._sampling_batch)
        db.advance(launched.ids)
        self._sampling_batch.update_history(launched.ids)
        return launched

    def _finish_step(self, step: LaunchedStep, *, rebuild: bool = True) -> list[Generation]:
        """Reads a launched step's tokens (waits for its copy) and applies them to the host state.
        Sequences that left meanwhile (ended at an earlier step) are skipped: their token is void.
        Ended sequences leave the running set; with `rebuild`, also the device batch at once (the
        plain loop, whose host state is never behind)."""
        gens = self._generations(step)
        if any(g.finish_reason is not None for g in gens):
            for g in gens:
                if g.finish_reason is not None:
                    self.seqs.pop(g.request_id, None)
            if rebuild:
                self._decode_batch = None
        return gens

    def _sample_and_step(self, seqs: list[SeqState], logits: torch.Tensor | None) -> list[Generation]:
        gens = self._generations(self._sample_launch(seqs, logits, self._sampling_batch_for(seqs)))
        for g in gens:
            if g.finish_reason is not None:
                self.seqs.pop(g.request_id, None)
        return gens

    def _sampling_batch_for(self, seqs: list[SeqState]) -> SamplingBatch:
        rows = [
            SamplingRow(params=s.sampling, history=s.tokens, generator=s.generator, top_n=s.top_n) for s in seqs
        ]
        return SamplingBatch.prepare(rows, vocab_size=self.mc.vocab_size, device=self.device)

    def _sample_launch(self, seqs: list[SeqState], logits: torch.Tensor | None, batch: SamplingBatch) -> LaunchedStep:
        """Samples on the last pipeline stage (logits given); the other stages get the ids only.
        Queues the results' copy to the host and returns without waiting for it.

        `batch` is prepared on every rank all the same: its validation must fail on all ranks alike,
        or the others would wait in the broadcast below forever."""
        if logits is not None:
            out = self.sampler(logits, batch)
        else:  # logprobs exist on the last stage only
            b = len(seqs)
            out = SampleOutput(
                token_ids=torch.empty(b, dtype=torch.int64, device=self.device),
                logprobs=torch.full((b,), math.nan, device=self.device),
                top_ids=torch.empty(b, 0, dtype=torch.int64, device=self.device),
                top_logprobs=torch.empty(b, 0, device=self.device),
                top_n=(0,) * b,
            )
        if self.world_size > 1:
            # All ranks must feed identical ids into the next step and stop alike: the last rank's
            # choice wins (the router reads the last rank's answer too, so ids and logprobs match).
            import torch.distributed as dist

            dist.broadcast(out.token_ids, src=self.world_size - 1)
        step = LaunchedStep(seqs=seqs, ids=out.token_ids, host=out.start_host_copy())
        if self._gaps is not None:
            self._gaps.end(rows=len(seqs), kv_tokens=sum(s.kv_len for s in seqs))
        return step

    def _generations(self, step: LaunchedStep) -> list[Generation]:
        gens = []
        for s, row in zip(step.seqs, step.host.rows(), strict=True):
            if self.seqs.get(s.id) is not s:  # ended (or was filtered) after this step was launched
                continue
            tok = row.token_id
            s.tokens.append(tok)
            s.generated += 1
            gens.append(
                Generation(
                    request_id=s.id,
                    token_id=tok,
                    logprob=row.logprob,
                    generated_tokens=s.generated,
                    seed=s.sampling.seed,
                    finish_reason=s.finish_reason(tok),
                    top_tokens=TopTokens(ids=row.top_ids, logprobs=row.top_logprobs),
                )
            )
        return gens
