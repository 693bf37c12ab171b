"""Pipeline parallelism as a transformation of a built LlamaForCausalLM (like tp.py).

Stage p of pp keeps a contiguous slice of the decoder layers (uneven splits give the first stages
one more); stage 0 keeps embed_tokens, the last stage keeps norm + lm_head (with tied embeddings
its lm_head still loads model.embed_tokens.weight: hf_names maps it). Applied on the meta device,
so only the local layers are ever allocated and loaded, and the KV cache holds only them.

Hidden states move stage to stage with point-to-point send/recv on the default group:
- a later stage's embed_tokens is replaced by RecvHidden, which receives the (T, hidden) states of
  the previous stage instead of embedding the ids;
- an earlier stage has no norm / lm_head, so its forward returns the (T, hidden) states of every
  token, and a forward hook sends them to the next stage.
With tensor parallelism inside a stage, each TP rank talks to its counterpart of the same tp_rank
in the neighbouring stage (global rank +- tp_size), so no stage-internal gather is needed: after
the row-parallel all-reduces every TP rank of a stage holds the same hidden states.

T needs no message of its own: every rank builds the same ForwardBatch from the same RPC, so the
receiver sizes its buffer from input_ids. Sampling (only the last stage has logits) and the
broadcast of the sampled ids to every rank live in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from shard.engine.base import EngineConfigError
from shard.native.config import ModelConfig

if TYPE_CHECKING:
    from shard.native.model import LlamaForCausalLM


@dataclass(frozen=True)
class PPStage:
    rank: int  # pipeline stage index (DistContext.pp_rank)
    size: int
    prev_rank: int | None = None  # global rank the hidden states come from; None on the first stage
    next_rank: int | None = None  # global rank they go to; None on the last stage

    @classmethod
    def single(cls) -> PPStage:
        return cls(rank=0, size=1)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


def stage_layers(num_layers: int, stage: PPStage) -> tuple[int, int]:
    """[start, stop) of the layers stage `stage.rank` owns: the first `num_layers % size` stages get one more."""
    base, extra = divmod(num_layers, stage.size)
    start = stage.rank * base + min(stage.rank, extra)
    return start, start + base + (stage.rank < extra)


def check_pipeline_parallel(config: ModelConfig, stage: PPStage) -> None:
    if stage.size < 1 or not 0 <= stage.rank < stage.size:
        raise EngineConfigError(f"invalid pipeline stage {stage.rank} of {stage.size}")
    if stage.size > config.num_layers:
        raise EngineConfigError(
            f"pipeline parallel size {stage.size} exceeds the model's {config.num_layers} layers: every stage "
            f"needs at least one; use --pipeline-parallel-size {config.num_layers} or fewer"
        )
    if (stage.prev_rank is None) != stage.is_first or (stage.next_rank is None) != stage.is_last:
        raise EngineConfigError(f"pipeline stage {stage.rank} of {stage.size} lacks a neighbour's rank")


class RecvHidden(nn.Module):
    """Stands in for embed_tokens on a later stage: (T,) ids -> the (T, hidden) states the previous
    stage sent for those tokens."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, src: int) -> None:
        super().__init__()
        self.hidden_size, self.dtype, self.src = hidden_size, dtype, src

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.empty(input_ids.shape[0], self.hidden_size, dtype=self.dtype, device=input_ids.device)
        dist.recv(h, src=self.src)
        return h


def _send_hook(dst: int):
    def hook(_model: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        dist.send(output.contiguous(), dst=dst)  # output (T, hidden): this stage's last hidden states

    return hook


def apply_pipeline_parallel(model: LlamaForCausalLM, stage: PPStage) -> None:
    """Cuts `model` in place down to stage `stage.rank` of `stage.size` and installs the send/recv.

    Call it on the meta device, after apply_tensor_parallel (which shards the whole model's
    lm_head): then only this stage's parameters are allocated and loaded."""
    config = model.config
    check_pipeline_parallel(config, stage)
    if stage.size == 1:
        return
    start, stop = stage_layers(config.num_layers, stage)
    model.layers = nn.ModuleList(model.layers[start:stop])
    model.layer_offset = start
    if not stage.is_first:
        assert stage.prev_rank is not None
        dtype = model.embed_tokens.weight.dtype
        model.embed_tokens = RecvHidden(config.hidden_size, dtype, stage.prev_rank)
    if not stage.is_last:
        assert stage.next_rank is not None
        model.norm = None
        model.lm_head = None  # forward then returns every token's hidden states
        model.register_forward_hook(_send_hook(stage.next_rank))
