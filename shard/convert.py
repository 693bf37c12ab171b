"""protobuf <-> engine types for the shard's gRPC server (server.py): pure functions, no I/O."""

from __future__ import annotations

import time
from collections.abc import Sequence

from shard.engine.base import InvalidRequestError
from shard.engine.types import (
    EngineInfo,
    EngineKind,
    FinishReason,
    Generation,
    NewRequest,
    SamplingParams,
    StepResult,
    StoppingParams,
    TopTokens,
    WarmupResult,
    WarmupSpec,
)
from shard.pb import generate_pb2 as pb

# ---------------------------------------------------------------- protobuf -> engine types


def sampling_from_pb(msg: pb.SamplingParameters) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
        typical_p=msg.typical_p,
        do_sample=msg.do_sample,
        seed=msg.seed,
        repetition_penalty=msg.repetition_penalty,
        frequency_penalty=msg.frequency_penalty,
    )


def request_from_pb(msg: pb.Request) -> NewRequest:
    # An absent sub-message means "all defaults" (proto3 would otherwise hand us zeros).
    sampling = sampling_from_pb(msg.sampling) if msg.HasField("sampling") else SamplingParams()
    if not msg.HasField("stopping") or msg.stopping.max_new_tokens == 0:
        raise InvalidRequestError(f"request {msg.id}: stopping.max_new_tokens must be >= 1")
    stopping = StoppingParams(
        max_new_tokens=msg.stopping.max_new_tokens,
        ignore_eos_token=msg.stopping.ignore_eos_token,
        stop_token_ids=tuple(msg.stopping.stop_token_ids),
    )
    return NewRequest(
        id=msg.id,
        input_ids=tuple(msg.input_ids),
        sampling=sampling,
        stopping=stopping,
        blocks=tuple(msg.blocks),
        prefix_len=msg.prefix_len,
        top_n_tokens=msg.top_n_tokens,
        prefill_logprobs=msg.prefill_logprobs,
        generated_before=msg.generated_before,
    )


def extensions_from_pb(msgs: Sequence[pb.BlockExtension]) -> dict[int, tuple[int, ...]]:
    """Request id -> blocks to append; an id listed twice gets both lists, in order."""
    extensions: dict[int, tuple[int, ...]] = {}
    for ext in msgs:
        extensions[ext.request_id] = extensions.get(ext.request_id, ()) + tuple(ext.blocks)
    return extensions


def warmup_spec_from_pb(msg: pb.WarmupRequest) -> WarmupSpec:
    return WarmupSpec(
        max_input_tokens=msg.max_input_tokens,
        max_total_tokens=msg.max_total_tokens,
        max_batch_prefill_tokens=msg.max_batch_prefill_tokens,
        max_batch_size=msg.max_batch_size,
    )


# ---------------------------------------------------------------- engine types -> protobuf

_ENGINE_KIND = {EngineKind.NATIVE: pb.ENGINE_KIND_NATIVE, EngineKind.TRTLLM: pb.ENGINE_KIND_TRTLLM}
_FINISH_REASON = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
}


def info_to_pb(info: EngineInfo) -> pb.InfoResponse:
    return pb.InfoResponse(
        model_id=info.model_id,
        dtype=info.dtype,
        device_type=info.device_type,
        world_size=info.world_size,
        tp_size=info.tp_size,
        pp_size=info.pp_size,
        engine=_ENGINE_KIND[info.engine],
        block_size=info.block_size,
        manages_kv_cache=info.manages_kv_cache,
        max_batch_size=info.max_batch_size,
        max_input_tokens=info.max_input_tokens,
        max_total_tokens=info.max_total_tokens,
        max_batch_prefill_tokens=info.max_batch_prefill_tokens,
        max_beam_width=info.max_beam_width,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        supports_prefix_caching=info.supports_prefix_caching,
        supports_prefill_logprobs=info.supports_prefill_logprobs,
        max_top_n_tokens=info.max_top_n_tokens,
        engine_version=info.engine_version,
        unsupported_parameters=info.unsupported_parameters,
        supports_mixed_batches=info.supports_mixed_batches,
    )


def tokens_to_pb(tokens: TopTokens) -> pb.Tokens:
    return pb.Tokens(ids=tokens.ids, logprobs=tokens.logprobs)


def generation_to_pb(gen: Generation) -> pb.Generation:
    msg = pb.Generation(
        request_id=gen.request_id,
        token_id=gen.token_id,
        logprob=gen.logprob,
        finish_reason=_FINISH_REASON[gen.finish_reason],
        generated_tokens=gen.generated_tokens,
        seed=gen.seed,
    )
    if gen.top_tokens.ids:  # left unset when none were asked: the router then skips it cheaply
        msg.top_tokens.CopyFrom(tokens_to_pb(gen.top_tokens))
    if gen.prefill_tokens is not None:
        msg.prefill_tokens.CopyFrom(tokens_to_pb(gen.prefill_tokens))
    return msg


def columns_to_pb(gens: Sequence[Generation]) -> pb.TokenColumns:
    """Decode-step tokens as packed columns (proto TokenColumns); prefill_tokens never occur here."""
    cols = pb.TokenColumns(
        request_ids=[g.request_id for g in gens],
        token_ids=[g.token_id for g in gens],
        logprobs=[g.logprob for g in gens],
        finish_reasons=[_FINISH_REASON[g.finish_reason] for g in gens],
        generated_tokens=[g.generated_tokens for g in gens],
        seeds=[g.seed for g in gens],
    )
    if any(g.top_tokens.ids for g in gens):
        cols.top_counts.extend([len(g.top_tokens.ids) for g in gens])
        cols.top_ids.extend([i for g in gens for i in g.top_tokens.ids])
        cols.top_logprobs.extend([lp for g in gens for lp in g.top_tokens.logprobs])
    return cols


def warmup_to_pb(result: WarmupResult) -> pb.WarmupResponse:
    return pb.WarmupResponse(
        num_blocks=result.num_blocks,
        block_size=result.block_size,
        max_supported_total_tokens=result.max_supported_total_tokens,
    )


def timings_to_pb(result: StepResult, started_ns: int) -> pb.Timings:
    return pb.Timings(forward_ns=result.forward_ns, total_ns=time.perf_counter_ns() - started_ns)
