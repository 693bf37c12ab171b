"""Engine types -> TensorRT-LLM Executor requests; the model's special token ids.

Sampling is mapped field by field onto `SamplingConfig` (documented keyword arguments that exist in
every TensorRT-LLM from 0.16 to 1.2): greedy is top_k=1; sampling passes temperature, top_k (0 = off)
and top_p explicitly (TensorRT-LLM treats top_k=0 with top_p unset as greedy, so 1.0 stands for
"off"); neutral penalties are left unset; the seed is always passed, and reported back.
SamplingConfig has no typical-p, so a request asking for it is refused (InvalidRequestError): the
router should refuse it first when Info.engine is TRTLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shard.engine.base import EngineConfigError, InvalidRequestError
from shard.engine.types import NewRequest, SamplingParams
from shard.trtllm.discovery import EngineLocation, find_model_file
from shard.trtllm.limits import EngineLimits
from shard.trtllm.validate import load_json


@dataclass(frozen=True)
class SpecialIds:
    end_id: int  # TensorRT-LLM's end_id: the model's first EOS id
    pad_id: int
    eos_ids: tuple[int, ...]  # every EOS id, end_id first; the others become single-token stop words


def _ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, bool):
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def read_special_ids(location: EngineLocation, tokenizer_name: str = "") -> SpecialIds:
    """EOS and pad ids from generation_config.json, else the model's Hugging Face config.json."""
    for name in ("generation_config.json", "config.json"):
        path = find_model_file(location, name, tokenizer_name)
        if path is None:
            continue
        data = load_json(path)
        eos = _ids(data.get("eos_token_id"))
        if eos:
            pad = _ids(data.get("pad_token_id"))
            return SpecialIds(end_id=eos[0], pad_id=pad[0] if pad else eos[0], eos_ids=eos)
    raise EngineConfigError(
        f"cannot find the model's EOS token id for {location.engine_dir}: copy the model's generation_config.json "
        "into the engine folder (trtllm-build does not) or pass --tokenizer-name <Hugging Face model folder>"
    )


def sampling_kwargs(params: SamplingParams, request_id: int) -> dict[str, Any]:
    """Keyword arguments of SamplingConfig(beam_width=1, **kwargs) for one request."""
    if 0.0 < params.typical_p < 1.0:
        raise InvalidRequestError(
            f"request {request_id}: typical_p is not supported by the TensorRT-LLM engine "
            "(its SamplingConfig has no typical-p); drop typical_p or serve with --engine native"
        )
    kwargs: dict[str, Any] = {"seed": params.seed}
    if params.is_greedy:
        kwargs["top_k"] = 1
    else:
        if params.temperature <= 0.0:
            raise InvalidRequestError(f"request {request_id}: temperature must be > 0 when sampling")
        kwargs["temperature"] = params.temperature
        kwargs["top_k"] = max(params.top_k, 0)
        kwargs["top_p"] = params.top_p if 0.0 < params.top_p < 1.0 else 1.0
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.frequency_penalty != 0.0:
        kwargs["frequency_penalty"] = params.frequency_penalty
    return kwargs


def check_request(request: NewRequest, limits: EngineLimits) -> int:
    """Refuses what the adapter cannot do; returns max_tokens (new tokens still to generate)."""
    rid = request.id
    if request.top_n_tokens > 0:
        raise InvalidRequestError(
            f"request {rid}: top_n_tokens is not supported by the TensorRT-LLM engine "
            "(the Executor returns only the chosen token's logprob)"
        )
    if request.prefill_logprobs:
        raise InvalidRequestError(
            f"request {rid}: prompt logprobs (decoder_input_details) are not supported by the TensorRT-LLM engine"
        )
    if not request.input_ids:
        raise InvalidRequestError(f"request {rid}: empty prompt")
    if len(request.input_ids) > limits.max_input_tokens:
        raise InvalidRequestError(
            f"request {rid}: {len(request.input_ids)} prompt tokens exceed the engine's limit {limits.max_input_tokens}"
        )
    max_tokens = request.stopping.max_new_tokens - request.generated_before
    if max_tokens < 1:
        raise InvalidRequestError(
            f"request {rid}: generated_before {request.generated_before} leaves no room under max_new_tokens "
            f"{request.stopping.max_new_tokens}"
        )
    if len(request.input_ids) + max_tokens > limits.max_total_tokens:
        raise InvalidRequestError(
            f"request {rid}: {len(request.input_ids)} prompt + {max_tokens} new tokens exceed the engine's "
            f"max_seq_len {limits.max_total_tokens}"
        )
    return max_tokens


def stop_ids(request: NewRequest, special: SpecialIds) -> tuple[int, ...]:
    """Token ids that end the request besides end_id: the other EOS ids and the request's stop ids.

    ignore_eos_token drops them all and end_id becomes -1, as TensorRT-LLM's own worker does.
    """
    if request.stopping.ignore_eos_token:
        return ()
    extra = [*special.eos_ids[1:], *request.stopping.stop_token_ids]
    return tuple(dict.fromkeys(t for t in extra if t != special.end_id))


def build_request(trtllm: Any, request: NewRequest, special: SpecialIds, max_tokens: int) -> Any:
    """A streaming `trtllm.Request` (trtllm = tensorrt_llm.bindings.executor)."""
    stops = stop_ids(request, special)
    return trtllm.Request(
        list(request.input_ids),
        max_tokens,
        streaming=True,
        sampling_config=trtllm.SamplingConfig(1, **sampling_kwargs(request.sampling, request.id)),
        output_config=trtllm.OutputConfig(return_log_probs=True, exclude_input_from_output=True),
        end_id=-1 if request.stopping.ignore_eos_token else special.end_id,
        pad_id=special.pad_id,
        stop_words=[[t] for t in stops] or None,
    )
