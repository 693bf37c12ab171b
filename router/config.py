"""Router configuration: one frozen dataclass, parsed once from the command line with
environment-variable fallbacks (TGI's names: MAX_INPUT_TOKENS, ...). The launcher passes every
flag explicitly; the fallbacks serve a router started on its own (docker-compose)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

# TensorRT-LLM's CapacitySchedulerPolicy names (its default is guaranteed_no_evict).
SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict")


@dataclass(frozen=True)
class RouterConfig:
    master_shard_uds_path: str = "unix:///tmp/tgi-trtllm-shard-0"  # or host:port for TCP
    hostname: str = "0.0.0.0"
    port: int = 3000
    tokenizer_name: str = ""  # HF folder/name or a .gguf file
    model_id: str = ""  # the name /info and /v1/models report
    cache_dir: str = ""  # converted tokenizer cache ("" = ~/.cache/tgi-trtllm)
    max_input_tokens: int = 0  # 0 = derive from the shard's limits
    max_total_tokens: int = 0
    max_batch_prefill_tokens: int = 0
    max_batch_total_tokens: int = 0
    max_batch_size: int = 0  # 0 = the engine's, else unbounded by count
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    max_decode_steps: int = 4  # decode steps per RPC while no waiting request needs to join at once (1 = per-token RPCs)
    payload_limit: int = 2_000_000
    api_key: str = ""
    prefix_caching: bool = True
    # Prefill calls carry the running batch's next decode step, where the engine can (Info). Off by
    # default: on one H100 it gained at 1000/1000 and lost at 128/128 and 2048/128 (BENCHMARKS.md).
    mixed_batches: bool = False
    # KV admission: max_utilization (prompt + 1 token must fit; growth preempts the newest) or
    # guaranteed_no_evict (every running request's full length is reserved; never preempts).
    scheduler_policy: str = "max_utilization"
    cors_allow_origin: str = ""
    # An idle server's first prefill waits up to this long while requests are still being
    # validated (and the waiting ones do not fill a prefill), so a burst runs as one prefill
    # (router/arrivals.py). 0 = off: the first request goes at once, as in TGI. 50 by default:
    # on one H100 it raised 128/128 at concurrency 64 through HTTP from 93.3% to 95.7% of the
    # engine without HTTP (six runs each, two hosts; BENCHMARKS.md, thirteenth session).
    burst_hold_ms: float = 50.0
    # Threads that tokenize prompts (TGI's flag; the Rust tokenizer releases the GIL, so they run
    # beside the event loop). 0 = min(4, CPU cores).
    validation_workers: int = 0

    def __post_init__(self) -> None:
        if self.burst_hold_ms < 0:
            raise ValueError(f"--burst-hold-ms must be >= 0 (0 = off); got {self.burst_hold_ms}")
        if self.validation_workers < 0:
            raise ValueError(f"--validation-workers must be >= 0 (0 = automatic); got {self.validation_workers}")
        if self.scheduler_policy not in SCHEDULER_POLICIES:
            raise ValueError(
                f"--scheduler-policy must be one of {', '.join(SCHEDULER_POLICIES)}; got {self.scheduler_policy!r}"
            )

    @property
    def listen_url(self) -> str:
        return f"http://{self.hostname}:{self.port}"

    def __repr__(self) -> str:  # never print the API key
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
        shown["api_key"] = "<set>" if self.api_key else ""
        return f"RouterConfig({shown})"


def _env_name(field_name: str) -> str:
    return field_name.upper()


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> RouterConfig:
    """Flags win over environment variables, which win over the dataclass defaults."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog="python -m router", description="tgi-trtllm HTTP router")
    for f in fields(RouterConfig):
        default = f.default
        env_value = env.get(_env_name(f.name))
        kind = type(default)
        conv = _parse_bool if kind is bool else kind
        if env_value is not None:
            default = conv(env_value)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=conv,
            default=default,
            help=f"(env {_env_name(f.name)}; default {default!r})" if f.name != "api_key" else "(env API_KEY)",
        )
    ns = parser.parse_args(argv)
    try:
        return RouterConfig(**vars(ns))
    except ValueError as e:
        parser.error(str(e))
