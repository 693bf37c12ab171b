"""NativeEngine: the PyTorch engine behind the shard's gRPC API (shard/engine/base.py).

Per-request state lives here (tokens, block table, sampling state); the router decides who runs
and owns block allocation. Every rank runs the same steps. Under pipeline parallelism only the last
stage has logits, so only it samples (and reports logprobs); the last rank's sampled ids are
broadcast to every rank of the world, so all ranks feed identical tokens into the next step and
stop alike (EOS, max_new_tokens), and TP ranks agree even if their sampling were to diverge.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shard.engine.base import InvalidRequestError, OutOfResourcesError
from shard.engine.types import (
    EngineInfo,
    EngineKind,
    Generation,
    StepResult,
    WarmupResult,
    WarmupSpec,
)
from shard.native.batch import DecodeBatch
from shard.native.config import ModelConfig
from shard.native.decode_steps import DecodeSteps, LaunchedStep, SeqState
from shard.native.forward import ForwardBatch
from shard.native.gpu_gaps import GpuGaps, gaps_enabled
from shard.native.kv_cache import KVCache, kv_bytes_per_block
from shard.native.memory import plan_kv_blocks
from shard.native.prefill_steps import PrefillSteps
from shard.native.sampler import Sampler
from shard.native.sampling_batch import SamplingBatch

log = logging.getLogger(__name__)

# Largest decode batch captured as a CUDA graph; Info reports it as the engine's batch limit on
# CUDA (a --max-batch-size flag overrides it). Larger batches would run eager, and a full batch
# lets the router keep multi-step decode calls (router/scheduler.py). Measured on one H100, 128/128
# with 1,024 prompts at once: 6,676 output tok/s capped at 256 vs 6,032 uncapped (second session);
# 12,137 capped at 512 vs 11,441 at 256, same device call (fourth session).
MAX_GRAPH_BATCH = 1024


@dataclass(frozen=True)
class RuntimeOptions:
    """What the engine needs from the shard config (kept small so tests can build engines)."""

    model_id: str
    block_size: int = 16
    kv_cache_fraction: float = 0.9
    kv_cache_tokens: int = 0
    cuda_graphs: bool = True
    fused_kernels: bool = True  # CUDA, bf16/fp16: Triton RMSNorm/residual/rotary (fp32 stays eager, HF-exact)
    cpu_packed_linears: bool = True  # CPU, float32: oneDNN-prepacked weights (cpu_linear.py)
    # Multi-step decode with the host one step behind the device (_decode_overlapped). None = on
    # for CUDA without pipeline parallelism; True forces it (tests run its logic on CPU).
    overlap_decode: bool | None = None
    max_total_tokens: int = 0


class NativeEngine(PrefillSteps, DecodeSteps):
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        model_config: ModelConfig,
        options: RuntimeOptions,
        device: torch.device,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
        pp_rank: int = 0,
        pp_size: int = 1,
        world_size: int = 1,
    ) -> None:
        if device.type == "cuda" and device.index is None:  # "cuda" -> the current GPU, by index
            device = torch.device("cuda", torch.cuda.current_device())
        self.model = model
        self.mc = model_config
        self.opt = options
        self.device = device
        self.dtype = dtype
        self.tp_rank, self.tp_size, self.world_size = tp_rank, tp_size, world_size
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.is_last_stage = pp_rank == pp_size - 1  # the only stage with logits
        if options.fused_kernels and device.type == "cuda" and dtype != torch.float32:
            model.enable_fused_kernels()
        if options.cpu_packed_linears:
            from shard.native.cpu_linear import pack_linears, packing_available

            if packing_available(device, dtype):
                log.info("packed %d linears for oneDNN", pack_linears(model))
        self.block_size = options.block_size
        self.kv: KVCache | None = None
        self.seqs: dict[int, SeqState] = {}
        self.sampler = Sampler(model_config.vocab_size, device)
        self._decode_batch: DecodeBatch | None = None
        self._decode_rows: list[SeqState] = []  # the device batch's rows (may hold ended sequences)
        self._sampling_batch: SamplingBatch | None = None  # rows as _decode_rows; penalties see new tokens
        self._carried: LaunchedStep | None = None  # launched, tokens not returned yet (decode_steps.py)
        self._orphans: list[Generation] = []  # read from _carried outside Decode; the next one returns them
        self._graphs = None  # GraphedDecode once captured (CUDA only)
        overlap = options.overlap_decode
        self._overlap = (device.type == "cuda" and pp_size == 1) if overlap is None else overlap
        self._healthy = True
        # SHARD_GPU_GAPS=1: the GPU's idle time between pieces of work, logged (gpu_gaps.py)
        self._gaps = GpuGaps(rank=tp_rank + pp_rank) if gaps_enabled(device) else None
        self._step_kind = "call"  # gpu_gaps' name for the next decode step launched

    @classmethod
    def create(cls, config, dist) -> NativeEngine:  # (ShardConfig, DistContext): shard/config.py, shard/dist.py
        from shard.native.factory import engine_parts

        return cls(**engine_parts(config, dist))

    # -- Engine protocol --------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        max_total = self.mc.max_position_embeddings
        if self.opt.max_total_tokens:
            max_total = min(max_total, self.opt.max_total_tokens)
        return EngineInfo(
            model_id=self.opt.model_id,
            dtype=str(self.dtype).removeprefix("torch."),
            device_type=self.device.type,
            world_size=self.world_size,
            tp_size=self.tp_size,
            pp_size=self.pp_size,
            engine=EngineKind.NATIVE,
            block_size=self.block_size,
            manages_kv_cache=False,
            vocab_size=self.mc.vocab_size,
            eos_token_ids=tuple(self.mc.eos_token_ids),
            max_total_tokens=max_total,
            max_batch_size=MAX_GRAPH_BATCH if self._graphs_enabled() else 0,
            engine_version=f"torch {torch.__version__}",
            supports_mixed_batches=True,
        )

    def _graphs_enabled(self) -> bool:
        return self.opt.cuda_graphs and self.device.type == "cuda" and self.pp_size == 1

    def warmup(self, spec: WarmupSpec) -> WarmupResult:
        self._bind_device()
        self.clear()
        self.kv = None
        self._graphs = None
        per_block = kv_bytes_per_block(
            num_layers=len(self.model.layers),  # this pipeline stage's
            block_size=self.block_size,
            num_kv_heads=self.model.num_local_kv_heads,
            head_dim=self.mc.head_dim,
            dtype=self.dtype,
        )
        num_blocks = plan_kv_blocks(
            engine=self, spec=spec, bytes_per_block=per_block, block_size=self.block_size, options=self.opt
        )
        min_blocks = math.ceil((spec.max_total_tokens + 1) / self.block_size)
        if num_blocks < min_blocks:
            raise OutOfResourcesError(
                f"the KV cache fits {num_blocks * self.block_size} tokens, fewer than one request of "
                f"--max-total-tokens {spec.max_total_tokens}: lower --max-total-tokens or raise "
                f"--kv-cache-fraction / --kv-cache-tokens"
            )
        # One extra block at the end is scratch for padded rows of captured decode graphs; the
        # router never sees it.
        self.kv = KVCache.allocate(
            num_layers=len(self.model.layers),
            num_blocks=num_blocks + 1,
            block_size=self.block_size,
            num_kv_heads=self.model.num_local_kv_heads,
            head_dim=self.mc.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        if self._graphs_enabled():
            self._capture_graphs(spec, num_blocks)
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                 num_blocks * per_block / 2**30)
        if self._gaps is not None:  # count serving only, not warmup's trial batches
            self._gaps = GpuGaps(rank=self._gaps.rank)
        return WarmupResult(
            num_blocks=num_blocks, block_size=self.block_size, max_supported_total_tokens=num_blocks * self.block_size
        )

    def graph_max_batch(self, spec: WarmupSpec) -> int:
        """Largest decode batch captured at this Warmup (0: no graphs)."""
        if not self._graphs_enabled():
            return 0
        return min(spec.max_batch_size or MAX_GRAPH_BATCH, MAX_GRAPH_BATCH)

    def _capture_graphs(self, spec: WarmupSpec, num_blocks: int) -> None:
        from shard.native.cuda_graphs import GraphedDecode

        assert self.kv is not None
        kv = self.kv
        self._graphs = GraphedDecode(
            lambda batch, out: self.model(batch, kv, logits_out=out),
            max_batch_size=self.graph_max_batch(spec),
            max_blocks_per_seq=math.ceil((spec.max_total_tokens + 1) / self.block_size),
            vocab_size=self.mc.vocab_size,
            device=self.device,
            block_size=self.block_size,
            scratch_slot=num_blocks * self.block_size,
        )

    @torch.inference_mode()
    def decode(self, extensions: dict[int, Sequence[int]], max_steps: int) -> StepResult:
        self._bind_device()
        if self._gaps is not None:
            self._gaps.call_start()
        self._compact()  # rows that ended in the last call leave the device batch first
        if extensions and not self._extend_in_flight(extensions):
            self._settle()  # the batch is rebuilt with the new blocks, from current host state
            self._extend(extensions)
        start = time.perf_counter_ns()
        self._step_kind = "call"
        if self._overlap:
            out, steps = self._decode_overlapped(max(1, max_steps))
        else:
            out, steps = [], 0
            while steps < max(1, max_steps) and self.seqs:
                out.extend(self._finish_step(self._launch_step()))
                steps += 1
        if self._gaps is not None:
            self._gaps.call_end(steps=steps, tokens=len(out))
        return StepResult(generations=out, steps=steps, forward_ns=time.perf_counter_ns() - start)

    def filter(self, remove_ids: Sequence[int]) -> int:
        self._bind_device()
        self._settle()
        gone = set(remove_ids)
        self._orphans = [g for g in self._orphans if g.request_id not in gone]
        for rid in remove_ids:
            if self.seqs.pop(rid, None) is not None:
                self._decode_batch = None
        return len(self.seqs)

    def clear(self) -> None:
        self._bind_device()
        try:
            self._settle()  # waits for the step in flight: nothing may still write the cache after this
        except Exception:  # ClearCache follows failures: a broken step is dropped, not re-raised
            self._carried = None
        self._orphans = []
        self.seqs.clear()
        self._decode_batch = None

    def healthy(self) -> bool:
        return self._healthy

    def shutdown(self) -> None:
        self.clear()
        self._graphs = None
        self.kv = None

    # -- internals --------------------------------------------------------------------------------
    def _bind_device(self) -> None:
        """The gRPC layer calls us from a worker thread, and CUDA's current device is per thread:
        Triton launches (and graph capture) use the current device, so rank r must select GPU r
        here, not only in the main thread."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _extend(self, extensions: dict[int, Sequence[int]]) -> None:
        """Appends block extensions (Decode's, a mixed Prefill's), after _settle. Requests that
        ended in a carried step read outside a call are skipped: the router learns of the end
        from the next answer, so it may still send them blocks."""
        ended = {g.request_id for g in self._orphans if g.finish_reason is not None}
        for rid, blocks in extensions.items():
            seq = self.seqs.get(rid)
            if seq is None and rid in ended:
                continue
            if seq is None:
                raise InvalidRequestError(f"unknown request id {rid} in block extensions")
            seq.blocks.extend(blocks)
        if extensions:
            self._decode_batch = None

    def _forward(self, batch: ForwardBatch) -> torch.Tensor | None:
        """(L, V) float32 logits on the last pipeline stage; None on the others (their forward has
        sent its hidden states on to the next stage)."""
        assert self.kv is not None
        out = self.model(batch, self.kv)
        return out if self.is_last_stage else None
