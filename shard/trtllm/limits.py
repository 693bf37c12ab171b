"""Build limits of a TensorRT-LLM engine (config.json's build_config) and what they mean for Info.

TGI's TensorRT-LLM backend hard-coded 1024/2048 token limits; here every limit comes from the
engine, and the launcher's caps may only lower them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shard.engine.base import EngineConfigError


@dataclass(frozen=True)
class EngineLimits:
    """What trtllm-build compiled in. An engine refuses (or cannot schedule) anything larger."""

    max_batch_size: int
    max_input_len: int  # prompt tokens of one request
    max_seq_len: int  # prompt + generated tokens of one request
    max_beam_width: int
    max_num_tokens: int  # tokens one engine iteration processes (all requests together)
    # Context chunking needs paged context FMHA; without it a prompt must fit one iteration.
    chunked_context: bool

    @property
    def max_input_tokens(self) -> int:
        """Longest prompt the engine runs: without chunking a prompt must fit max_num_tokens too."""
        if self.chunked_context:
            return self.max_input_len
        return min(self.max_input_len, self.max_num_tokens)

    @property
    def max_total_tokens(self) -> int:
        return self.max_seq_len

    @property
    def max_batch_prefill_tokens(self) -> int:
        """Prompt tokens per Prefill call. TensorRT-LLM spreads a larger batch over iterations itself;
        one iteration's worth keeps first tokens prompt, and never less than one longest prompt."""
        return max(self.max_num_tokens, self.max_input_tokens)


def _positive_int(section: Mapping[str, Any], key: str, where: str) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineConfigError(f"{where}: build_config.{key} must be a positive integer, got {value!r}")
    return value


def read_limits(
    build_config: Mapping[str, Any], pretrained_config: Mapping[str, Any], where: str
) -> EngineLimits:
    """Reads the limits of a trtllm-build 0.16+ build_config; `where` names the file in errors.

    max_seq_len may be null in hand-written configs: trtllm-build then derives it from the model's
    max_position_embeddings, and so do we. max_num_tokens null means trtllm-build's own default
    rule (max_batch_size x max_input_len, capped by the engine at build time); we take that bound.
    """
    batch = _positive_int(build_config, "max_batch_size", where)
    input_len = _positive_int(build_config, "max_input_len", where)
    if batch is None or input_len is None:
        raise EngineConfigError(
            f"{where}: build_config lacks max_batch_size or max_input_len; "
            "this is not a trtllm-build 0.16+ engine config: rebuild the engine with trtllm-build"
        )
    seq_len = _positive_int(build_config, "max_seq_len", where)
    if seq_len is None:
        seq_len = _positive_int(pretrained_config, "max_position_embeddings", where)
    if seq_len is None:
        raise EngineConfigError(
            f"{where}: neither build_config.max_seq_len nor max_position_embeddings is set"
        )
    if seq_len <= 1:
        raise EngineConfigError(f"{where}: build_config.max_seq_len {seq_len} leaves no room to generate")
    num_tokens = _positive_int(build_config, "max_num_tokens", where) or batch * input_len
    beam = _positive_int(build_config, "max_beam_width", where) or 1
    plugins = build_config.get("plugin_config") or {}
    return EngineLimits(
        max_batch_size=batch,
        max_input_len=min(input_len, seq_len - 1),
        max_seq_len=seq_len,
        max_beam_width=beam,
        max_num_tokens=num_tokens,
        chunked_context=bool(plugins.get("use_paged_context_fmha", False)),
    )


def check_caps(
    limits: EngineLimits, *, max_batch_size: int, max_input_tokens: int, max_total_tokens: int
) -> None:
    """The launcher's caps (0 = none) may lower the engine's limits, never raise them."""
    for flag, asked, limit, build_flag in (
        ("--max-batch-size", max_batch_size, limits.max_batch_size, "--max_batch_size"),
        ("--max-input-tokens", max_input_tokens, limits.max_input_tokens, "--max_input_len"),
        ("--max-total-tokens", max_total_tokens, limits.max_total_tokens, "--max_seq_len"),
    ):
        if asked and asked > limit:
            raise EngineConfigError(
                f"{flag} {asked} exceeds the engine's limit {limit}: lower {flag} "
                f"or rebuild the engine with a larger trtllm-build {build_flag}"
            )
