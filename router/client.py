"""Sharded gRPC client: every call fans out to every rank (ranks run in lockstep, as in TGI).

Ranks return identical token ids (the last rank's sampled ids are broadcast to every rank), but
only the last pipeline stage has logits, so only its logprobs and top tokens are real (earlier
stages report NaN). The router therefore reads the last rank's answer -- the one whose sample was
broadcast -- and only checks that the others succeeded. Any rank failing fails the call with
GenerationError.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import grpc

from router import calltrace, metrics
from router.errors import GenerationError
from router.pb import generate_pb2 as pb
from router.pb import generate_pb2_grpc as pb_grpc
from router.types import (
    FinishReason,
    GenerateRequest,
    PrefillOut,
    ShardInfo,
    TokenOut,
)

log = logging.getLogger(__name__)

_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
_ENGINES = {pb.ENGINE_KIND_NATIVE: "native", pb.ENGINE_KIND_TRTLLM: "trtllm"}
# A decode-step token and the request it belongs to.
TokenRow = tuple[int, TokenOut]
_NONE = itertools.repeat(())  # no top tokens, for every row (map stops at the shortest column)
_FINISH = {pb.FINISH_REASON_LENGTH: FinishReason.LENGTH, pb.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN}

R = TypeVar("R")


def _target(url: str) -> str:
    """grpc wants unix:///abs/path or host:port; accept both and a bare path."""
    if url.startswith("unix:") or ":" in url:
        return url
    return f"unix://{url}"


class ShardedClient:
    def __init__(self, urls: Sequence[str]) -> None:
        assert urls, "at least one shard url"
        self.urls = tuple(urls)
        self._channels = [grpc.aio.insecure_channel(_target(u), options=_OPTIONS) for u in self.urls]
        self._stubs = [pb_grpc.TextGenerationServiceStub(c) for c in self._channels]

    @classmethod
    async def connect(cls, master_url: str, timeout: float = 30.0) -> ShardedClient:
        """Asks the master shard for every rank's url (ServiceDiscovery) and connects to all."""
        async with grpc.aio.insecure_channel(_target(master_url), options=_OPTIONS) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            resp = await stub.ServiceDiscovery(pb.ServiceDiscoveryRequest(), timeout=timeout)
        return cls(list(resp.urls) or [master_url])

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def _fan_out(self, call: Callable[[pb_grpc.TextGenerationServiceStub], Awaitable[R]]) -> R:
        results = await asyncio.gather(*(call(s) for s in self._stubs), return_exceptions=True)
        for rank, res in enumerate(results):
            if isinstance(res, grpc.aio.AioRpcError):
                raise GenerationError(f"shard {rank}: {res.code().name}: {res.details()}") from res
            if isinstance(res, BaseException):
                raise GenerationError(f"shard {rank}: {res!r}") from res
        return results[-1]  # type: ignore[return-value]

    async def health(self, timeout: float = 5.0) -> bool:
        try:
            await self._fan_out(lambda s: s.Health(pb.HealthRequest(), timeout=timeout))
        except GenerationError:
            return False
        return True

    async def info(self) -> ShardInfo:
        r = await self._fan_out(lambda s: s.Info(pb.InfoRequest(), timeout=60))
        return ShardInfo(
            model_id=r.model_id,
            dtype=r.dtype,
            device_type=r.device_type,
            world_size=r.world_size,
            tp_size=r.tp_size,
            pp_size=r.pp_size,
            engine=_ENGINES.get(r.engine, "unknown"),
            block_size=r.block_size,
            manages_kv_cache=r.manages_kv_cache,
            vocab_size=r.vocab_size,
            eos_token_ids=tuple(r.eos_token_ids),
            max_batch_size=r.max_batch_size,
            max_input_tokens=r.max_input_tokens,
            max_total_tokens=r.max_total_tokens,
            max_batch_prefill_tokens=r.max_batch_prefill_tokens,
            supports_prefix_caching=r.supports_prefix_caching,
            supports_prefill_logprobs=r.supports_prefill_logprobs,
            max_top_n_tokens=r.max_top_n_tokens,
            engine_version=r.engine_version,
            unsupported_parameters=tuple(r.unsupported_parameters),
            supports_mixed_batches=r.supports_mixed_batches,
            urls=self.urls,
        )

    async def warmup(
        self, *, max_input_tokens: int, max_total_tokens: int, max_batch_prefill_tokens: int, max_batch_size: int
    ) -> pb.WarmupResponse:
        req = pb.WarmupRequest(
            max_input_tokens=max_input_tokens,
            max_total_tokens=max_total_tokens,
            max_batch_prefill_tokens=max_batch_prefill_tokens,
            max_batch_size=max_batch_size,
        )
        # Warmup loads kernels, captures CUDA graphs and sizes the KV cache: minutes on a big model.
        return await self._fan_out(lambda s: s.Warmup(req, timeout=1800))

    async def prefill(
        self,
        requests: Sequence[pb.Request],
        *,
        decode_running: bool = False,
        extensions: Iterable[tuple[int, Sequence[int]]] = (),
    ) -> tuple[list[pb.Generation], list[TokenRow], int]:
        """-> (one generation per request, the running batch's tokens (decode_running only),
        forward ns)."""
        req = pb.PrefillRequest(
            requests=requests,
            decode_running=decode_running,
            extensions=[pb.BlockExtension(request_id=i, blocks=b) for i, b in extensions],
        )
        calltrace.mark("send", "prefill")
        resp = await self._fan_out(lambda s: s.Prefill(req))
        calltrace.mark("recv", "prefill")
        metrics.BATCH_SHARD_DURATION.labels(method="prefill").observe(resp.timings.total_ns / 1e9)
        out = list(resp.generations), token_rows(resp.decode_tokens), resp.timings.forward_ns
        calltrace.mark("parsed", "prefill")
        return out

    async def decode(
        self, extensions: Iterable[tuple[int, Sequence[int]]], max_steps: int
    ) -> tuple[list[TokenRow], int]:
        """-> (the tokens, step-major, as (request id, token) rows; forward ns)."""
        req = pb.DecodeRequest(
            extensions=[pb.BlockExtension(request_id=i, blocks=b) for i, b in extensions], max_steps=max_steps
        )
        calltrace.mark("send", "decode")
        resp = await self._fan_out(lambda s: s.Decode(req))
        calltrace.mark("recv", "decode")
        metrics.BATCH_SHARD_DURATION.labels(method="decode").observe(resp.timings.total_ns / 1e9)
        rows = token_rows(resp.tokens)
        calltrace.mark("parsed", "decode")
        return rows, resp.timings.forward_ns

    async def filter(self, remove_ids: Sequence[int]) -> None:
        req = pb.FilterBatchRequest(remove_ids=remove_ids)
        await self._fan_out(lambda s: s.FilterBatch(req))

    async def clear(self) -> None:
        await self._fan_out(lambda s: s.ClearCache(pb.ClearCacheRequest()))


def to_pb_request(
    *, request_id: int, req: GenerateRequest, input_ids: Sequence[int], blocks: Sequence[int],
    prefix_len: int, generated_before: int,
) -> pb.Request:
    s = req.sampling
    return pb.Request(
        id=request_id,
        input_ids=input_ids,
        sampling=pb.SamplingParameters(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            typical_p=s.typical_p,
            do_sample=s.do_sample,
            seed=s.seed,
            repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
        ),
        stopping=pb.StoppingParameters(
            max_new_tokens=req.max_new_tokens,
            ignore_eos_token=req.ignore_eos_token,
            stop_token_ids=req.stop_token_ids,
        ),
        blocks=blocks,
        prefix_len=prefix_len,
        top_n_tokens=req.top_n_tokens,
        prefill_logprobs=req.prefill_logprobs,
        generated_before=generated_before,
    )


def token_out(g: pb.Generation) -> TokenOut:
    # Per token on the router's one thread: touching an unset submessage builds an empty one, so
    # top_tokens is read only when present (HasField is 20x cheaper than the two tuples).
    if g.HasField("top_tokens"):
        top = g.top_tokens
        return TokenOut(g.token_id, g.logprob, tuple(top.ids), tuple(top.logprobs), _FINISH.get(g.finish_reason))
    return TokenOut(g.token_id, g.logprob, (), (), _FINISH.get(g.finish_reason))


def token_rows(cols: pb.TokenColumns) -> list[TokenRow]:
    """Decode-step tokens from their columns (proto TokenColumns), in order."""
    fins = [_FINISH.get(f) for f in cols.finish_reasons]
    if not cols.top_counts:
        return list(zip(cols.request_ids, map(TokenOut, cols.token_ids, cols.logprobs, _NONE, _NONE, fins), strict=True))
    rows, at = [], 0
    top_ids, top_lps = cols.top_ids, cols.top_logprobs
    for rid, tok, lp, n, fin in zip(
        cols.request_ids, cols.token_ids, cols.logprobs, cols.top_counts, fins, strict=True
    ):
        rows.append((rid, TokenOut(tok, lp, tuple(top_ids[at : at + n]), tuple(top_lps[at : at + n]), fin)))
        at += n
    return rows


def prefill_out(g: pb.Generation) -> PrefillOut | None:
    if not g.HasField("prefill_tokens"):
        return None
    return PrefillOut(ids=tuple(g.prefill_tokens.ids), logprobs=tuple(g.prefill_tokens.logprobs))
