"""CUDA graphs for decode steps: capture a decode forward once per batch-size bucket, then replay.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
gaps. Each bucket's graph reads fixed input buffers (one set shared by all buckets, sliced to the
bucket), so a call copies the batch in, pads it to the bucket, replays, and slices the logits.

Padding rows must never touch a real sequence's K/V: they write their K/V to `scratch_slot`, a slot
of a block that no request owns. The engine allocates that block on top of the router's blocks:
with a cache of num_blocks blocks for the router, allocate num_blocks + 1 and pass
scratch_slot = num_blocks * block_size. Padding rows have seq_len 1, position 0, block table row
[scratch_block, ...], so their attention reads only the scratch slot they just wrote.

Invariant relied on: attention reads block-table entries [0, cdiv(seq_len, block_size)) of a row
only, so entries a previous, longer batch left in the static block table are never read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shard.native.forward import ForwardBatch


def default_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, multiples of 8 up to 256, of 32 up to 512, of 64 above, and max_batch_size itself.
    (Above 256 a step costs ~25 us per row on an H100 at Llama-3.1-8B shapes, so padding to a
    multiple of 32 or 64 costs little, and each graph captured adds warmup time.)"""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += list(range(8, min(max_batch_size, 257), 8))
    sizes += list(range(288, min(max_batch_size, 513), 32))
    sizes += list(range(576, max_batch_size, 64))
    sizes = [s for s in sizes if s < max_batch_size]
    sizes.append(max_batch_size)
    return sorted(set(sizes))


def pick_bucket(batch_sizes: Sequence[int], n: int) -> int | None:
    """Smallest bucket >= n (batch_sizes sorted ascending), None if n exceeds them all."""
    for size in batch_sizes:
        if size >= n:
            return size
    return None


class StaticDecodeInputs:
    """The fixed input buffers every captured graph reads, sized for max_batch_size rows.

    view(bucket) is the ForwardBatch handed to the model at capture; stage(batch, bucket) copies a
    real batch into the first rows and resets rows [n, bucket) to harmless padding."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_blocks_per_seq: int,
        block_size: int,
        scratch_slot: int,
        device: torch.device,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_seqlen_k = max_blocks_per_seq * block_size
        self.scratch_slot = scratch_slot
        self.scratch_block = scratch_slot // block_size
        n = max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full(
            (n, max_blocks_per_seq), self.scratch_block, dtype=torch.int32, device=device
        )
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        # Decode: one token per sequence, so these never change.
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)

    def view(self, bucket: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bucket],
            positions=self.positions[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket],
            cu_seqlens_q=self.cu_seqlens_q[: bucket + 1],
            logits_indices=self.logits_indices[:bucket],
            is_prefill=False,
            max_seqlen_q=1,
            max_seqlen_k=self.max_seqlen_k,
        )

    def stage(self, batch: ForwardBatch, bucket: int) -> None:
        n = batch.num_seqs
        width = batch.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(batch.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        if bucket > n:
            # Rows a previous, larger batch used hold real slots: point them back at the scratch.
            self.slot_mapping[n:bucket].fill_(self.scratch_slot)
            self.seq_lens[n:bucket].fill_(1)
            self.positions[n:bucket].fill_(0)
            self.block_tables[n:bucket, 0].fill_(self.scratch_block)


class GraphedDecode:
    """Replays captured decode steps; falls back to nothing -- check supports() first.

    forward_fn(batch, out) -> logits (batch.num_seqs, vocab_size) must be capturable: no host
    syncs, no allocation sizes that depend on tensor values (the model bound to its KV cache, with
    the Triton attention backend). `out` is a float32 (num_seqs, vocab_size) view of one static
    buffer that every bucket shares: a forward_fn that writes its logits there (the model's
    logits_out) costs no copy; one that returns another tensor gets it copied in. Capture runs
    forward_fn a few times on padding rows (scratch slot only), largest bucket first, all buckets
    in one memory pool.

    Why one shared output: each graph's own output stays allocated for the graph's life, and the
    float32 logits of every bucket up to 512 held 3.6 GiB at Llama-3.1-8B's vocabulary (10 GiB
    up to 1,024). One buffer holds max_batch_size rows; the buckets' other intermediates are free
    after their capture and the pool reuses them for the next.

    __call__ returns a view of the static output: it is overwritten by the next call, so consume
    (sample) it before then."""

    def __init__(
        self,
        forward_fn: Callable[[ForwardBatch, torch.Tensor], torch.Tensor],
        *,
        max_batch_size: int,
        max_blocks_per_seq: int,
        vocab_size: int,
        device: torch.device,
        block_size: int,
        scratch_slot: int,
        batch_sizes: Sequence[int] | None = None,
        warmup_steps: int = 2,
    ) -> None:
        self.forward_fn = forward_fn
        self.vocab_size = vocab_size
        self.device = device
        self.batch_sizes = sorted(set(batch_sizes)) if batch_sizes else default_batch_sizes(max_batch_size)
        assert self.batch_sizes[-1] <= max_batch_size
        self.max_batch_size = self.batch_sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.inputs = StaticDecodeInputs(
            max_batch_size=self.max_batch_size, max_blocks_per_seq=max_blocks_per_seq, block_size=block_size,
            scratch_slot=scratch_slot, device=device,
        )  # fmt: skip
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # (max_batch_size, vocab) float32, outside the graphs' pool: bucket b writes rows [0, b).
        self._logits = torch.empty((self.max_batch_size, vocab_size), dtype=torch.float32, device=device)
        self._capture_all(warmup_steps)

    @torch.no_grad()
    def _capture_all(self, warmup_steps: int) -> None:
        pool = None
        stream = torch.cuda.Stream(device=self.device)
        for bucket in reversed(self.batch_sizes):
            batch = self.inputs.view(bucket)
            out = self._logits[:bucket]
            # Warm up outside capture: Triton compiles, cuBLAS picks kernels and the allocator
            # settles here, none of which may happen while capturing.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup_steps):
                    self._forward_into(batch, out)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._forward_into(batch, out)
            pool = graph.pool()
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def _forward_into(self, batch: ForwardBatch, out: torch.Tensor) -> None:
        logits = self.forward_fn(batch, out)
        if tuple(logits.shape) != tuple(out.shape):
            raise ValueError(f"decode forward returned logits {tuple(logits.shape)}, expected {tuple(out.shape)}")
        if logits.data_ptr() != out.data_ptr():
            out.copy_(logits)

    def supports(self, batch: ForwardBatch) -> bool:
        """A decode batch (one token per sequence) that fits the captured buckets and block table."""
        return (
            not batch.is_prefill
            and 0 < batch.num_seqs <= self.max_batch_size
            and batch.num_tokens == batch.num_seqs
            and batch.logits_indices.shape[0] == batch.num_seqs
            and batch.block_tables.shape[1] <= self.max_blocks_per_seq
        )

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.num_seqs
        bucket = pick_bucket(self.batch_sizes, n)
        assert bucket is not None and self.supports(batch), "call supports(batch) first"
        self.inputs.stage(batch, bucket)
        self._graphs[bucket].replay()
        return self._logits[:n]
