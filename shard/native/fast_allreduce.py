"""The row-parallel all-reduce of tensor parallelism, with a one-shot path for small messages.

Every layer ends its attention and its MLP with an all-reduce of a (tokens, hidden) tensor: at
batch 1 on Llama-3.1-8B that is 64 all-reduces of 8 KiB per token, where NCCL's fixed cost per
call dominates. torch's symmetric memory offers a one-shot all-reduce: each rank copies its part
into a buffer that every peer maps over NVLink, then reads all peers' buffers and sums -- one
kernel, no NCCL launch protocol. Used for messages up to ONE_SHOT_MAX_BYTES (decode batches);
prefill-sized tensors keep NCCL, whose ring/tree algorithms win there. It needs no NVLink
multicast (KINDS.md keeps NVLS off), and it is captured in CUDA graphs like any kernel.

Set-up is collective: every rank of the group builds it, checks one all-reduce against the sum it
must give, and all agree (a MIN over the group) before it is used, so a rank where it failed
cannot leave the others waiting in a one-shot kernel.

OFF unless SHARD_ONE_SHOT_ALLREDUCE=1, because it does not pay in the engine. It used to hang a
real shard world at start: the engine is built on the engine thread, whose current CUDA device was
GPU 0 on every rank (CUDA's current device is per thread); factory.py now selects the rank's GPU
there first, and a two-rank shard with it on serves and matches transformers (fourth session,
bench/results/gpu-h100-20261126-skinny/engine-x2-oneshot/). Measured on 2 H100s: alone, 64
graph-replayed all-reduces of 8 KiB take 9.0 us each against NCCL's 13.1 (bench/allreduce_bench.py);
in the engine's decode step at batch 1 it is no faster (250.2 vs 254.4 tok/s, 244.9 vs 248.4 in
another call). Why the isolated gain does not reach the step is not yet understood.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ONE_SHOT_MAX_BYTES = 512 * 1024  # decode batches up to 64 tokens of a 4096-wide bf16 hidden state


class RowParallelReduce:
    """Sums a row-parallel layer's partial outputs over the tensor-parallel group, in place."""

    def __init__(self, group: object | None) -> None:
        self.group = group
        self._one_shot: _OneShot | None = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        one_shot = self._one_shot
        if one_shot is not None and one_shot.fits(t):
            one_shot(t)
        else:
            dist.all_reduce(t, group=self.group)
        return t

    def enable_one_shot(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Collective over the group. True when every rank could set the one-shot path up."""
        if device.type != "cuda" or os.environ.get("SHARD_ONE_SHOT_ALLREDUCE", "0") != "1":
            return False
        one_shot: _OneShot | None = None
        try:
            one_shot = _OneShot(self.group, device, dtype)
            ok = one_shot.self_check()
        except Exception as e:  # an older torch, no peer access, ...: NCCL it is
            log.warning("one-shot all-reduce unavailable, NCCL for every size: %s", e)
            ok = False
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if flag.item() == 1:
            self._one_shot = one_shot
            log.info("one-shot all-reduce for messages up to %d KiB", ONE_SHOT_MAX_BYTES // 1024)
            return True
        return False


class _OneShot:
    def __init__(self, group: object | None, device: torch.device, dtype: torch.dtype) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        pg = group if group is not None else dist.group.WORLD
        self.group_name = pg.group_name  # type: ignore[union-attr]
        self.dtype = dtype
        self.max_numel = ONE_SHOT_MAX_BYTES // dtype.itemsize
        # (max_numel,) symmetric buffer: one per group, mapped by every peer
        self.buf = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buf, self.group_name)
        self.rank = dist.get_rank(pg)  # type: ignore[arg-type]
        self.size = dist.get_world_size(pg)  # type: ignore[arg-type]

    def fits(self, t: torch.Tensor) -> bool:
        return t.dtype == self.dtype and t.numel() <= self.max_numel and t.is_contiguous()

    def __call__(self, t: torch.Tensor) -> None:
        flat = t.view(-1)
        # copies flat into this rank's buffer, sums every rank's buffer into flat
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(
            self.buf[: flat.numel()], flat, "sum", self.group_name, flat
        )

    def self_check(self) -> bool:
        """One decode-sized all-reduce, compared with the sum it must give."""
        n = 4096 * 3 + 8  # odd size: not a multiple of any vector width
        t = torch.full((n,), float(self.rank + 1), dtype=self.dtype, device=self.buf.device)
        self(t)
        want = self.size * (self.size + 1) / 2
        return bool(torch.all(t == want).item())
