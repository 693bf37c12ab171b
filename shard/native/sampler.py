"""Token sampling for the native engine: one device step per token (host-side preparation:
sampling_batch.py). `Sampler.__call__` runs only device ops: no `.item()`, no data-dependent shapes, so
nothing waits for the device until the engine reads the sampled ids (`SampleOutput.to_host`, one
copy per step).

Semantics follow Hugging Face transformers' logits processors as TGI chains them:
    repetition_penalty -> frequency_penalty -> [logprobs] -> temperature -> top_k -> top_p
    -> typical_p -> sample
Logprobs (of the chosen token and of the top-n alternatives) are log_softmax(penalized / T),
with T = 1 for greedy rows, taken before the top-k/top-p/typical-p filters so alternatives outside
the sampled set keep finite logprobs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shard.native.sampling_batch import SamplingBatch


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
        self._fused_greedy = False
        if self.device.type == "cuda" and os.environ.get("SHARD_FUSED_GREEDY", "1") != "0":
            from shard.native.kernels import triton_available

            self._fused_greedy = triton_available()

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

    def warm_up(self, logits: torch.Tensor) -> None:
        """Loads the greedy kernel (if used) on (B, V) float32 logits; the result is dropped."""
        if self._fused_greedy:
            from shard.native.kernels.greedy import greedy_pick

            greedy_pick(logits.float().contiguous())

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
        scaled, filtered = self.process(logits, batch)
        n = batch.max_top_n
        if filtered is None and not n and self._fused_greedy:
            # every row greedy, no top-n: token and logprob in one pass (kernels/greedy.py)
            from shard.native.kernels.greedy import greedy_pick

            token_ids, logprobs = greedy_pick(scaled.contiguous())
            return SampleOutput(
                token_ids=token_ids,
                logprobs=logprobs,
                top_ids=torch.empty(batch.size, 0, dtype=torch.int64, device=scaled.device),
                top_logprobs=torch.empty(batch.size, 0, dtype=torch.float32, device=scaled.device),
                top_n=batch.top_n,
            )
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
