"""The row-parallel all-reduce of tensor parallelism, fused with the norm after it at decode sizes.

Every layer ends its attention and its MLP with an all-reduce of a (tokens, hidden) tensor, and
the fused forward (model.py _forward_fused) follows each with a residual add + RMSNorm kernel. At
batch 1 on Llama-3.1-8B that is 64 all-reduces of 8 KiB per token, where NCCL's fixed cost (~13 us
in a CUDA graph on 2 H100s) dominates. For forwards of at most max_rows tokens the reduce is
instead *deferred* to the norm: the matmul's hook leaves its partial sums alone, and
`add_rms_norm` runs kernels/lamport.py, which sums the ranks' parts over NVLink and does the add
and the norm in the same launch. Larger forwards (prefill) keep NCCL, whose ring wins there.

A forward brackets its calls with begin(rows) / end(): the decision (defer or not) is taken once
per forward, so the hooks and the norms agree, and the fused calls are counted so that their
buffer halves alternate (lamport.py explains why that is required).

Set-up is collective: every rank allocates its buffer in torch's symmetric memory (mapped by
every peer; no NVLink multicast, which KINDS.md keeps off), checks one fused call against the
unfused result, and all agree (a MIN over the group) before it is used, so a rank where it failed
cannot leave the others spinning. On by default at two and four ranks (measured and tested
there); SHARD_FUSED_ALLREDUCE=1 turns it on at any size (the kernel is written for any rank
count, but has run only at 2 and 4), =0 turns it off.

(The fourth session's path, torch's one_shot_all_reduce op on its own, was 9.0 us against NCCL's
13.1 alone but did not pay in the step; it is gone.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# (x, residual, weight, eps) -> (rmsnorm(residual + x) * weight, residual updated in place)
AddNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]

MAX_ROWS = 128  # decode batches up to 128 tokens (1 MiB of a 4096-wide bf16 hidden state per rank)
# Group sizes where it is on without SHARD_FUSED_ALLREDUCE=1: measured faster than NCCL + norm at
# every size up to MAX_ROWS and tested against it (BENCHMARKS.md, tenth and eleventh sessions).
DEFAULT_SIZES = (2, 4)


class RowParallelReduce:
    """Sums a row-parallel layer's partial outputs over the tensor-parallel group: in place from
    the layer's hook, or deferred into the next norm (add_rms_norm) while a forward defers."""

    def __init__(self, group: object | None) -> None:
        self.group = group
        self._fused: _Lamport | None = None
        self._defer = False  # this forward's reduces ride in its norms
        self._calls = 0  # fused calls in this forward: the next one's buffer half is _calls % 2

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """The row-parallel layer's forward hook: its output summed in place (or left partial
        while the forward defers: the norm after it sums)."""
        if not self._defer:
            dist.all_reduce(t, group=self.group)
        return t

    # -- the fused forward ------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self, rows: int, dtype: torch.dtype) -> Iterator[AddNorm]:
        """Brackets one forward of `rows` tokens; yields its add_rms_norm. The decision to defer
        is taken here, once, so that the hooks and the norms of the forward agree."""
        fused = self._fused
        self._defer = fused is not None and rows <= fused.max_rows and dtype == fused.dtype
        self._calls = 0
        try:
            yield self.add_rms_norm
            # An odd count would start the next forward on the half this one just used.
            assert not self._defer or self._calls % 2 == 0, f"{self._calls} fused reduces in a forward"
        finally:
            self._defer = False

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """norm.add_rms_norm of x summed over the group (x: a row-parallel output, partial while
        the forward defers, already summed by its hook otherwise)."""
        if not self._defer:
            from shard.native.kernels.norm import add_rms_norm

            return add_rms_norm(x, residual, weight, eps)
        assert self._fused is not None
        half = self._calls & 1
        self._calls += 1
        return self._fused(x, residual, weight, eps, half), residual

    # -- set-up -----------------------------------------------------------------------------------
    def enable_fused(self, device: torch.device, dtype: torch.dtype, hidden: int) -> bool:
        """Collective over the group. True when every rank could set the fused path up."""
        # On by default at 2 and 4 ranks, where it is measured and tested; =1 turns it on at any
        # size, =0 off.
        wanted = os.environ.get("SHARD_FUSED_ALLREDUCE", "")
        size = dist.get_world_size(self.group)  # type: ignore[arg-type]
        if device.type != "cuda" or wanted == "0" or (wanted != "1" and size not in DEFAULT_SIZES):
            return False
        fused: _Lamport | None = None
        try:
            fused = _Lamport(self.group, device, dtype, hidden)
            ok = fused.self_check()
        except Exception as e:  # an older torch, no peer access, no triton: NCCL it is
            log.warning("fused all-reduce unavailable, NCCL for every size: %s", e)
            ok = False
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if flag.item() == 1:
            self._fused = fused
            log.info("fused all-reduce + norm for forwards of up to %d tokens", fused.max_rows)
            return True
        return False


class _Lamport:
    def __init__(self, group: object | None, device: torch.device, dtype: torch.dtype, hidden: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        pg = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(pg)  # type: ignore[arg-type]
        self.world = dist.get_world_size(pg)  # type: ignore[arg-type]
        self.dtype = dtype
        self.hidden = hidden
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.max_rows = min(MAX_ROWS, sms)  # one program per row, all resident (lamport.py)
        self.slot = self.max_rows * hidden
        self.half = self.world * self.slot
        # (2 halves * WORLD slots * max_rows * hidden,) on every rank, mapped by every peer
        self.buf = symm_mem.empty(2 * self.half, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(self.buf, pg.group_name)  # type: ignore[union-attr]
        self.peers = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        bits = {2: torch.int16, 4: torch.int32}[self.buf.element_size()]
        self.buf.view(bits).fill_(torch.iinfo(bits).min)  # every element: negative zero, "not arrived"
        torch.cuda.synchronize(device)
        dist.barrier(group=pg)  # no rank sends before every buffer holds the sentinel

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, half: int
    ) -> torch.Tensor:
        from shard.native.kernels.lamport import lamport_add_rms_norm

        return lamport_add_rms_norm(
            x, residual, weight, eps, peers=self.peers, half_offset=half * self.half, slot=self.slot,
            rank=self.rank, world=self.world,
        )  # fmt: skip

    def self_check(self) -> bool:
        """Fused calls on both halves (odd row counts, a row of zeros) against the sum they must
        give, reduced on the host from the pattern every rank knows."""
        from shard.native.kernels.norm import add_rms_norm

        device = self.buf.device
        ok = True
        for half, rows in ((0, 3), (1, self.max_rows)):
            g = torch.Generator(device="cpu").manual_seed(rows)
            parts = torch.randn(self.world, rows, self.hidden, generator=g).to(self.dtype)
            parts[:, 0] = -0.0  # a row of negative zeros must travel (as +0), not hang
            residual = torch.randn(rows, self.hidden, generator=g).to(self.dtype)
            weight = torch.rand(self.hidden, generator=g).to(self.dtype).to(device)
            want_res = residual.to(device).clone()
            summed = parts.float().sum(0).to(self.dtype).to(device)
            want, want_res = add_rms_norm(summed, want_res, weight, 1e-5)
            res = residual.to(device).clone()
            got = self(parts[self.rank].to(device).contiguous(), res, weight, 1e-5, half)
            ok = ok and torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
            ok = ok and torch.allclose(res.float(), want_res.float(), atol=2e-2, rtol=2e-2)
        torch.cuda.synchronize(device)
        return bool(ok)
