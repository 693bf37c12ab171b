"""Token sampling for the native engine: host-side preparation, then one device step per token.

`SamplingBatch.prepare` turns per-request parameters and histories into device tensors once (one
packed host->device copy each for the parameters and the histories; pinned and non-blocking on
CUDA). `Sampler.__call__` then runs only device ops: no `.item()`, no data-dependent shapes, so
nothing waits for the device until the engine reads the sampled ids (`SampleOutput.to_host`, one
copy per step).

Semantics follow Hugging Face transformers' logits processors as TGI chains them:
    repetition_penalty -> frequency_penalty -> [logprobs] -> temperature -> top_k -> top_p
    -> typical_p -> sample
Logprobs (of the chosen token and of the top-n alternatives) are log_softmax(penalized / T),
with T = 1 for greedy rows, taken before the top-k/top-p/typical-p filters so alternatives outside
the sampled set keep finite logprobs.

Reuse across decode steps: a batch stays valid while its rows do not change. After each step call
`batch.update_history(out.token_ids)` so penalties count the new token; `select` drops finished
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


@dataclass(frozen=True)
class RowSample:
    """One row of a SampleOutput, on the host."""

    token_id: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(eq=False)
class SampleOutput:
    token_ids: torch.Tensor  # (B,) int64 on device
    logprobs: torch.Tensor  # (B,) float32: log-probability of the chosen token
    top_ids: torch.Tensor  # (B, N) int64, N = max top_n in the batch, best first
    top_logprobs: torch.Tensor  # (B, N) float32
    top_n: tuple[int, ...]  # per row: how many of the N columns that row asked for

    def to_host(self) -> list[RowSample]:
        """All four tensors in one device->host copy (the step's only sync)."""
        return self.start_host_copy().rows()

    def start_host_copy(self) -> HostCopy:
        """Queues the copy behind the kernels that produce these tensors and returns at once (CUDA);
        HostCopy.rows() waits for it. float64 holds int64 ids below 2**53 and float32 logprobs exactly."""
        packed = torch.cat(
            [
                self.token_ids.double()[:, None],
                self.logprobs.double()[:, None],
                self.top_ids.double(),
                self.top_logprobs.double(),
            ],
            dim=1,
        )
        if packed.device.type != "cuda":
            return HostCopy(packed=packed, event=None, n=self.top_ids.shape[1], top_n=self.top_n)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)  # cached pinned block
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostCopy(packed=host, event=event, n=self.top_ids.shape[1], top_n=self.top_n)


@dataclass(eq=False)
class HostCopy:
    """A SampleOutput on its way to the host: (B, 2 + 2N) float64 rows of
    [token_id, logprob, top_ids (N), top_logprobs (N)], valid once `event` has completed."""

    packed: torch.Tensor
    event: torch.cuda.Event | None
    n: int
    top_n: tuple[int, ...]

    def rows(self) -> list[RowSample]:
        if self.event is not None:
            self.event.synchronize()
        n = self.n
        return [
            RowSample(
                token_id=int(row[0]),
                logprob=row[1],
                top_ids=tuple(int(i) for i in row[2 : 2 + k]),
                top_logprobs=tuple(row[2 + n : 2 + n + k]),
            )
            for row, k in ((row, min(k, n)) for row, k in zip(self.packed.tolist(), self.top_n, strict=True))
        ]


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


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """(B, V) -> (B, V): HF's repetition penalty, then the frequency penalty, on the penalty rows."""
    if batch.counts is None:
        return logits
    rows = batch.penalty_rows
    x = logits if rows is None else logits.index_select(0, rows)  # (P, V)
    if batch.repetition is not None:
        # Repeated tokens become less likely whatever their sign; rows at 1.0 are unchanged exactly.
        penalized = torch.where(x < 0, x * batch.repetition, x / batch.repetition)
        x = torch.where(batch.counts > 0, penalized, x)
    if batch.frequency is not None:
        x = x - batch.frequency * batch.counts
    return x if rows is None else logits.index_copy(0, rows, x)


def filter_logits(
    logits: torch.Tensor,
    *,
    top_k: torch.Tensor | None,
    max_top_k: int,
    top_p_cut: torch.Tensor | None,
    typical_mass: torch.Tensor | None,
) -> torch.Tensor:
    """(S, V) temperature-scaled logits -> the same with filtered tokens at -inf.

    Mirrors HF's TopK/TopP/TypicalLogitsWarper (min_tokens_to_keep 1) with per-row parameters;
    each row keeps at least one token.
    """
    neg_inf = float("-inf")
    if top_k is not None:
        kth = logits.topk(max_top_k, dim=-1).values.gather(1, (top_k - 1).clamp(min=0))  # (S, 1)
        kth = kth.masked_fill(top_k == 0, neg_inf)
        logits = logits.masked_fill(logits < kth, neg_inf)
    if top_p_cut is not None:
        # Ascending as HF: the low tail whose cumulative probability stays <= 1 - top_p goes; the
        # top token always stays. By position, not by value, so ties at the cut split as in HF.
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= top_p_cut
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), neg_inf)
    if typical_mass is not None:
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)  # nansum: -inf * 0 at filtered tokens
        gap = (-logp - entropy).abs()  # distance of each token's surprise from the expected one
        sorted_gap, order = gap.sort(dim=-1)  # most typical first
        cumulative = logits.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < typical_mass).sum(dim=1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        # The most typical token is never above the cut, so at least one stays.
        logits = logits.masked_fill(gap > sorted_gap.gather(1, last), neg_inf)
    return logits


def _exponential_race(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """(S, V) -> (S,) ids drawn from softmax(logits), each row from its own generator.

    argmax(p / q) with q ~ Exp(1) picks i with probability p_i (the first of independent
    exponential clocks of rates p_i to ring), like torch.multinomial but without its host sync.
    Each row draws V numbers from its own generator, so its stream does not depend on the batch.
    """
    probs = logits.softmax(dim=-1)
    q = torch.empty_like(probs)
    for row, generator in zip(q, generators, strict=True):
        row.exponential_(generator=generator)
    q.clamp_min_(torch.finfo(q.dtype).tiny)  # a 0 draw would make 0/0 = NaN win the argmax
    return probs.div_(q).argmax(dim=-1)


class Sampler:
    """The device step: logits of the batch's last positions -> one token per row."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)

    def process(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, V) logits -> (scaled (B, V), filtered (S, V) or None when every row is greedy).

        scaled = penalized / temperature is what logprobs are taken from; filtered is scaled at the
        sampled rows with top-k/top-p/typical-p applied (what the draw uses). Never writes `logits`.
        """
        assert logits.shape == (batch.size, self.vocab_size), (logits.shape, batch.size, self.vocab_size)
        assert batch.vocab_size == self.vocab_size
        scaled = apply_penalties(logits.float(), batch)
        if batch.temperature is not None:
            scaled = scaled / batch.temperature
        if not batch.sampled_generators:  # S == 0
            return scaled, None
        rows = scaled if batch.sampled_rows is None else scaled.index_select(0, batch.sampled_rows)
        filtered = filter_logits(
            rows,
            top_k=batch.top_k,
            max_top_k=batch.max_top_k,
            top_p_cut=batch.top_p_cut,
            typical_mass=batch.typical_mass,
        )
        return scaled, filtered

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
        scaled, filtered = self.process(logits, batch)
        if filtered is None:  # greedy fast path: argmax, no sort, no RNG
            token_ids = scaled.argmax(dim=-1)
        else:
            sampled = _exponential_race(filtered, batch.sampled_generators)
            if batch.sampled_rows is None:
                token_ids = sampled
            else:  # greedy rows have temperature 1, so argmax(scaled) is their penalized argmax
                token_ids = scaled.argmax(dim=-1).index_copy_(0, batch.sampled_rows, sampled)
        # log_softmax at a few ids without materializing (B, V) log-probs.
        lse = scaled.logsumexp(dim=-1, keepdim=True)  # (B, 1)
        logprobs = (scaled.gather(1, token_ids[:, None]) - lse).squeeze(1)
        n = batch.max_top_n
        if n:
            top = scaled.topk(min(n, self.vocab_size), dim=-1)  # sorted, best first
            top_ids, top_logprobs = top.indices, top.values - lse
        else:
            top_ids = torch.empty(batch.size, 0, dtype=torch.int64, device=scaled.device)
            top_logprobs = torch.empty(batch.size, 0, dtype=torch.float32, device=scaled.device)
        return SampleOutput(
            token_ids=token_ids,
            logprobs=logprobs,
            top_ids=top_ids,
            top_logprobs=top_logprobs,
            top_n=batch.top_n,
        )
