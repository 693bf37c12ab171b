"""The launcher's flags: TGI's names, each with its environment fallback, parsed into LauncherConfig."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

MODES = ("all", "shards", "router")
# Checked here too so a typo fails before any process starts (the shard checks them again).
_CHOICES = {
    "mode": MODES,
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "load_format": ("auto", "dummy"),
    "log_level": ("debug", "info", "warning", "error"),
    "scheduler_policy": ("auto", "max_utilization", "guaranteed_no_evict"),
}


class LaunchError(Exception):
    """A launch that cannot proceed; the message says what to change."""


def _opt(default: Any, help: str, env: str | None = None, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, "env": env, **extra})


@dataclass(frozen=True)
class LauncherConfig:
    """Every flag of the launcher; env names are TGI's where TGI has the flag (metadata["env"])."""

    model_id: str = _opt(
        "",
        "HF folder, .gguf file, TensorRT-LLM engine folder or Hub id; default: the embedded SmolLM2-135M-Instruct",
    )
    revision: str = _opt("", "Hub revision, used only when --model-id is not a local path")
    tokenizer_name: str = _opt(
        "", "tokenizer folder or .gguf (default: --model-id); needed for TensorRT-LLM engine folders"
    )
    num_shard: int = _opt(1, "tensor-parallel ranks (GPUs) per pipeline stage")
    pipeline_parallel_size: int = _opt(1, "pipeline stages; the MPI world has num_shard x this ranks")
    hostname: str = _opt("0.0.0.0", "HTTP listen address")
    port: int = _opt(3000, "HTTP port")
    shard_uds_path: str = _opt(
        "", "unix socket prefix of the shards (default /tmp/tgi-trtllm-<pid>-*/shard, removed at exit)"
    )
    max_input_tokens: int = _opt(0, "0 = derive from the engine")
    max_total_tokens: int = _opt(0, "0 = derive from the engine")
    max_batch_prefill_tokens: int = _opt(0, "0 = derive from the engine")
    max_batch_total_tokens: int = _opt(0, "0 = what the KV cache holds after warmup")
    max_batch_size: int = _opt(0, "0 = the engine's limit")
    max_concurrent_requests: int = _opt(128, "requests in flight or queued before the router answers 429")
    max_best_of: int = _opt(2, "largest best_of a request may ask for")
    max_stop_sequences: int = _opt(4, "stop strings per request")
    max_top_n_tokens: int = _opt(5, "largest top_n_tokens a request may ask for")
    waiting_served_ratio: float = _opt(
        0.3, "waiting/running ratio at which queued requests join the running batch"
    )
    max_waiting_tokens: int = _opt(20, "decode steps after which queued requests join the batch anyway")
    max_decode_steps: int = _opt(
        4, "decode steps per router->shard call while nobody waits or the batch is within 1/8 of --max-batch-size"
    )
    max_client_batch_size: int = _opt(4, "inputs one client request may carry")
    validation_workers: int = _opt(0, "router threads that tokenize prompts; 0 = min(4, CPU cores)")
    burst_hold_ms: float = _opt(
        50.0,
        "an idle server's first prefill waits up to this long for requests still being validated "
        "(a burst then runs as one prefill; a lone request never waits); 0 = off, as in TGI",
    )
    payload_limit: int = _opt(2_000_000, "HTTP body limit in bytes")
    api_key: str = _opt(
        "", "require 'Authorization: Bearer <key>'; passed to the router by environment, never logged"
    )
    cors_allow_origin: str = _opt("", "origins allowed by CORS, comma-separated (empty: any origin, as in TGI)")
    dtype: str = _opt("auto", "auto | float32 | bfloat16 | float16")
    engine: str = _opt("native", "native | trtllm | package.module:factory")
    device: str = _opt("auto", "auto | cpu | cuda")
    load_format: str = _opt("auto", "auto | dummy (random weights from config.json, for benchmarks)")
    kv_cache_fraction: float = _opt(
        0.9,
        "GPU: share of memory left after weights and warmup for the KV cache",
        aliases=("--cuda-memory-fraction",),
        alias_env="CUDA_MEMORY_FRACTION",
    )
    kv_cache_tokens: int = _opt(0, "KV cache capacity in tokens (CPU, or a GPU override); 0 = engine default")
    block_size: int = _opt(16, "tokens per KV block")
    disable_prefix_caching: bool = _opt(False, "do not reuse cached prompt prefixes")
    mixed_batches: bool = _opt(
        False, "a prefill carries the running batch's next decode step (engines that support it: the native one)"
    )
    scheduler_policy: str = _opt(
        "auto",
        "KV admission: max_utilization (preempt when short) | guaranteed_no_evict (reserve each request's full "
        "length) | auto (the router's max_utilization for the native engine; TensorRT-LLM's guaranteed_no_evict)",
    )
    cuda_graphs: bool = _opt(True, "capture CUDA graphs for decode (--disable-cuda-graphs turns them off)")
    cache_dir: str = _opt("", "conversion cache (default ~/.cache/tgi-trtllm)")
    mpi_args: str = _opt("", "extra mpiexec arguments, shell-quoted (e.g. '-f hostfile')")
    mpiexec: str = _opt("", "mpiexec to use (default: next to this Python, else on PATH)")
    mode: str = _opt(
        "all", "all | shards (MPI world on TCP only) | router (router only)", env="LAUNCHER_MODE"
    )
    shard_host: str | None = _opt(
        None, "serve shards on TCP at this address (rank r on --shard-port + r); required for --mode shards"
    )
    shard_port: int = _opt(50051, "first shard TCP port")
    shard_advertise_host: str | None = _opt(
        None, "host name the router uses to reach the shards (e.g. a compose service)"
    )
    shard_address: str = _opt("", "--mode router: rank 0's address, host:port or unix:///path")
    log_level: str = _opt("info", "debug | info | warning | error")
    startup_timeout: float = _opt(600.0, "seconds the shards (and then the router) may take to become ready")

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.num_shard < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("--num-shard and --pipeline-parallel-size must be >= 1")
        if self.mode == "shards" and self.shard_host is None:
            raise ValueError("--mode shards serves the shards on TCP: give --shard-host (e.g. 0.0.0.0)")
        if self.mode == "router" and not self.shard_address:
            raise ValueError("--mode router needs --shard-address (rank 0's host:port or unix:///path)")

    @property
    def world_size(self) -> int:
        return self.num_shard * self.pipeline_parallel_size

    def __repr__(self) -> str:  # never print the API key
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
        shown["api_key"] = "<set>" if self.api_key else ""
        return f"LauncherConfig({shown})"


# ---------------------------------------------------------------- parsing


def env_name(f: Any) -> str:
    return f.metadata.get("env") or f.name.upper()


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _cuda_graphs_env(text: str) -> bool:
    # TGI's CUDA_GRAPHS is a list of batch sizes, "0" meaning off; any list means on here.
    return text.strip().lower() not in ("0", "false", "no", "off", "")


_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "str | None": lambda t: t or None}


def _env_default(f: Any, env: Mapping[str, str]) -> Any:
    for name in (env_name(f), f.metadata.get("alias_env")):
        if name and name in env:
            text = env[name]
            if f.name == "cuda_graphs":
                return _cuda_graphs_env(text)
            return _parse_bool(text) if str(f.type) == "bool" else _TYPES[str(f.type)](text)
    return None if f.default is MISSING else f.default


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgi-trtllm",
        description="Serve an LLM with a TGI-compatible API: MPI shards (native PyTorch or TensorRT-LLM) + router.",
    )
    for f in fields(LauncherConfig):
        flag = "--" + f.name.replace("_", "-")
        try:
            default = _env_default(f, env)
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error(f"{env_name(f)}: {e}")
        shown_default = "<hidden>" if f.name == "api_key" else repr(default)
        help_text = f"{f.metadata['help']} (env {env_name(f)}; default {shown_default})".lstrip()
        if f.name == "cuda_graphs":
            parser.add_argument(flag, dest=f.name, action="store_true", default=default, help=help_text)
            parser.add_argument(
                "--disable-cuda-graphs", dest=f.name, action="store_false", help="turn CUDA graphs off"
            )
        elif str(f.type) == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", default=default, help=help_text)
        else:
            names = [flag, *f.metadata.get("aliases", ())]
            parser.add_argument(
                *names, dest=f.name, type=_TYPES[str(f.type)], default=default, help=help_text
            )
    return parser


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> LauncherConfig:
    parser = build_parser(os.environ if env is None else env)
    ns = parser.parse_args(argv)
    try:
        return LauncherConfig(**vars(ns))
    except ValueError as e:
        parser.error(str(e))
