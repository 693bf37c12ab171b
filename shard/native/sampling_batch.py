"""Host-side preparation of the sampler's inputs (sampler.py runs the device step).

`SamplingBatch.prepare` turns per-request parameters and histories into device tensors once (one
packed host->device copy each for the parameters and the histories; pinned and non-blocking on
CUDA). Reuse across decode steps: a batch stays valid while its rows do not change. After each step
call `batch.update_history(out.token_ids)` so penalties count the new token; `select` drops finished
rows and `concat` merges batches (e.g. a prefill batch into the running one) without re-reading
histories on the host. Generators are shared by reference, so a rebuilt batch continues each
request's random stream where it stopped.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shard.engine.base import InvalidRequestError
from shard.engine.types import SamplingParams

# Thresholds that make a filter a no-op for a row that shares a batch with rows using it.
_TOP_P_OFF = -1.0  # cumulative probability is never <= -1: nothing removed
_TYPICAL_OFF = 2.0  # cumulative probability is always < 2: the cut lands on the last token


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own RNG; seed it once at Prefill and keep it for the request's lifetime."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)  # accepts the proto's full uint64 range
    return generator


@dataclass
class SamplingRow:
    """One request's inputs for this step, built host-side by the engine."""

    params: SamplingParams
    history: Sequence[int] | torch.Tensor  # every token id so far (prompt + generated), for penalties
    generator: torch.Generator | None  # the request's RNG when do_sample; None = torch's default RNG
    top_n: int = 0  # how many alternatives to return


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0


def _validate(p: SamplingParams, top_n: int) -> None:
    # The router validates with TGI's rules; this guards the shard against a bad direct caller.
    problems = []
    if not p.repetition_penalty > 0:
        problems.append(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
    if top_n < 0:
        problems.append(f"top_n_tokens must be >= 0, got {top_n}")
    if p.do_sample:
        if not p.temperature > 0:
            problems.append(f"temperature must be > 0 when sampling, got {p.temperature}")
        if p.top_k < 0:
            problems.append(f"top_k must be >= 0, got {p.top_k}")
        if not 0 <= p.top_p <= 1:
            problems.append(f"top_p must be in [0, 1], got {p.top_p}")
        if not 0 < p.typical_p <= 1:
            problems.append(f"typical_p must be in (0, 1], got {p.typical_p}")
    if problems:
        raise InvalidRequestError("; ".join(problems))


def _upload(
    values: list[float] | list[int] | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    host = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":  # pinned + non_blocking: the copy does not wait for queued kernels
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _count_tokens(
    histories: Sequence[Sequence[int] | torch.Tensor], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """(P, V) float32: how often each token id occurs in each history."""
    lengths = [len(h) for h in histories]
    rows = torch.repeat_interleave(torch.arange(len(histories)), torch.tensor(lengths))
    if any(isinstance(h, torch.Tensor) for h in histories):
        ids = torch.cat([torch.as_tensor(h, dtype=torch.int64).reshape(-1).to(device) for h in histories])
        flat = _upload(rows, torch.int64, device) * vocab_size + ids
    else:
        # np.fromiter is ~4x faster than torch.tensor on long Python lists.
        flat_ids = itertools.chain.from_iterable(histories)
        ids = torch.from_numpy(np.fromiter(flat_ids, dtype=np.int64, count=sum(lengths)))
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
            raise InvalidRequestError(f"a history holds a token id outside [0, {vocab_size})")
        flat = _upload(rows * vocab_size + ids, torch.int64, device)
    counts = torch.zeros(len(histories), vocab_size, dtype=torch.float32, device=device)
    # Float atomics are exact here: integer counts stay far below 2**24.
    counts.view(-1).index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=device))
    return counts


@dataclass(frozen=True, eq=False)  # eq=False: fields hold tensors; identity is what matters
class SamplingBatch:
    """Device tensors for one batch of rows (B rows; P of them with penalties, S sampled).

    Index tensors are None when they would list every row, so homogeneous batches skip the gather.
    """

    params: tuple[SamplingParams, ...]
    generators: tuple[torch.Generator | None, ...]  # (B,), used only for sampled rows
    top_n: tuple[int, ...]
    vocab_size: int
    device: torch.device
    temperature: torch.Tensor | None  # (B, 1) float32, 1.0 for greedy rows; None when all are 1
    penalty_rows: torch.Tensor | None  # (P,) int64
    counts: torch.Tensor | None  # (P, V) float32 token counts of each history; None when P == 0
    repetition: torch.Tensor | None  # (P, 1) float32; None when no row uses it
    frequency: torch.Tensor | None  # (P, 1) float32; None when no row uses it
    sampled_rows: torch.Tensor | None  # (S,) int64
    sampled_generators: tuple[torch.Generator | None, ...]  # (S,)
    top_k: torch.Tensor | None  # (S, 1) int64, 0 = off for that row; None when no row uses it
    max_top_k: int
    top_p_cut: torch.Tensor | None  # (S, 1) float32, 1 - top_p (HF's comparison); None when unused
    typical_mass: torch.Tensor | None  # (S, 1) float32; None when unused

    @property
    def size(self) -> int:
        return len(self.params)

    @property
    def max_top_n(self) -> int:
        return max(self.top_n, default=0)

    @classmethod
    def prepare(cls, rows: Sequence[SamplingRow], *, vocab_size: int, device: torch.device) -> SamplingBatch:
        device = torch.device(device)
        for r in rows:
            _validate(r.params, r.top_n)
        histories = [r.history for r in rows if _has_penalty(r.params)]
        return cls._build(
            params=tuple(r.params for r in rows),
            generators=tuple(r.generator for r in rows),
            top_n=tuple(r.top_n for r in rows),
            vocab_size=vocab_size,
            device=device,
            counts=_count_tokens(histories, vocab_size, device) if histories else None,
        )

    def update_history(self, token_ids: torch.Tensor) -> None:
        """Counts the token each row just produced ((B,) int64 on device) into the penalty state."""
        if self.counts is None:
            return
        ids = token_ids if self.penalty_rows is None else token_ids.index_select(0, self.penalty_rows)
        self.counts.scatter_add_(
            1, ids.view(-1, 1), torch.ones_like(ids, dtype=self.counts.dtype).view(-1, 1)
        )

    def select(self, indices: Sequence[int]) -> SamplingBatch:
        """The batch of rows `indices` (in that order), keeping their penalty counts."""
        penalized = [i for i, p in enumerate(self.params) if _has_penalty(p)]
        position = {row: j for j, row in enumerate(penalized)}
        keep = [position[i] for i in indices if i in position]
        counts = None
        if keep:
            assert self.counts is not None
            counts = self.counts.index_select(0, _upload(keep, torch.int64, self.device))
        return self._build(
            params=tuple(self.params[i] for i in indices),
            generators=tuple(self.generators[i] for i in indices),
            top_n=tuple(self.top_n[i] for i in indices),
            vocab_size=self.vocab_size,
            device=self.device,
            counts=counts,
        )

    @classmethod
    def concat(cls, batches: Sequence[SamplingBatch]) -> SamplingBatch:
        """Rows of `batches` one after the other (all of one vocab size and device)."""
        assert batches and len({(b.vocab_size, b.device) for b in batches}) == 1
        counts = [b.counts for b in batches if b.counts is not None]
        return cls._build(
            params=tuple(p for b in batches for p in b.params),
            generators=tuple(g for b in batches for g in b.generators),
            top_n=tuple(n for b in batches for n in b.top_n),
            vocab_size=batches[0].vocab_size,
            device=batches[0].device,
            counts=torch.cat(counts) if counts else None,
        )

    @classmethod
    def _build(
        cls,
        *,
        params: tuple[SamplingParams, ...],
        generators: tuple[torch.Generator | None, ...],
        top_n: tuple[int, ...],
        vocab_size: int,
        device: torch.device,
        counts: torch.Tensor | None,
    ) -> SamplingBatch:
        """Derives every small tensor from host params: one float and one int upload in all."""
        b = len(params)
        pen = [p for p in params if _has_penalty(p)]
        smp = [p for p in params if p.do_sample]
        assert (counts is None) == (not pen) and (counts is None or counts.shape == (len(pen), vocab_size))
        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in smp]  # k >= V keeps everything
        use = {
            "temperature": any(p.temperature != 1.0 for p in smp),
            "repetition": any(p.repetition_penalty != 1.0 for p in pen),
            "frequency": any(p.frequency_penalty != 0.0 for p in pen),
            "top_k": any(top_k),
            "top_p": any(p.top_p < 1.0 for p in smp),
            "typical": any(p.typical_p < 1.0 for p in smp),
        }
        # One flat float vector; each section becomes a view on the device.
        sections: list[tuple[str, list[float]]] = [
            ("temperature", [p.temperature if p.do_sample else 1.0 for p in params]),
            ("repetition", [p.repetition_penalty for p in pen]),
            ("frequency", [p.frequency_penalty for p in pen]),
            ("top_k", [float(k) for k in top_k]),  # exact in float32 for any real vocab
            ("top_p", [1.0 - p.top_p if p.top_p < 1.0 else _TOP_P_OFF for p in smp]),
            ("typical", [p.typical_p if p.typical_p < 1.0 else _TYPICAL_OFF for p in smp]),
        ]
        sections = [(name, values) for name, values in sections if use[name]]
        flat = _upload([v for _, values in sections for v in values], torch.float32, device)
        views = dict(zip([n for n, _ in sections], flat.split([len(v) for _, v in sections]), strict=True))
        col = {name: t.view(-1, 1) for name, t in views.items()}

        # Row indices only where a subset uses them; both lists travel in one int64 upload.
        pen_rows = [i for i, p in enumerate(params) if _has_penalty(p)]
        smp_rows = [i for i, p in enumerate(params) if p.do_sample]
        if len(pen_rows) == b:
            pen_rows = []
        if len(smp_rows) == b:
            smp_rows = []
        pen_idx, smp_idx = _upload(pen_rows + smp_rows, torch.int64, device).split(
            [len(pen_rows), len(smp_rows)]
        )
        return cls(
            params=params,
            generators=generators,
            top_n=top_n,
            vocab_size=vocab_size,
            device=device,
            temperature=col.get("temperature"),
            penalty_rows=pen_idx if pen_rows else None,
            counts=counts,
            repetition=col.get("repetition"),
            frequency=col.get("frequency"),
            sampled_rows=smp_idx if smp_rows else None,
            sampled_generators=tuple(g for p, g in zip(params, generators, strict=True) if p.do_sample),
            top_k=col["top_k"].long() if "top_k" in col else None,
            max_top_k=max(top_k, default=0),
            top_p_cut=col.get("top_p"),
            typical_mass=col.get("typical"),
        )
