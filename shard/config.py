"""Shard configuration: one frozen dataclass, parsed once from the command line.

Every flag has an environment fallback named SHARD_<FIELD> (SHARD_MODEL_ID, SHARD_TP_SIZE, ...);
flags win over the environment, which wins over the defaults. The prefix keeps the shard clear of
the launcher's and router's TGI names (PORT means the HTTP port there, not the shard's). The
launcher passes every flag explicitly, so the fallbacks serve a shard started by hand.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
LOG_LEVELS = ("debug", "info", "warning", "error")
# KV admission (TensorRT-LLM's CapacitySchedulerPolicy names). The router admits for paged engines;
# TensorRT-LLM admits itself, so the shard passes it on. auto = the engine's default.
SCHEDULER_POLICIES = ("auto", "max_utilization", "guaranteed_no_evict")
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_UDS_PATH_BYTES = 107
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


@dataclass(frozen=True)
class ShardConfig:
    model_id: str  # HF folder, .gguf file, engine folder (trtllm), or a folder with only config.json (dummy)
    # "native" | "trtllm" | "package.module:callable" (a factory(config, dist) -> Engine; see registry)
    engine: str = "native"
    dtype: str = "auto"
    device: str = "auto"  # auto = cuda when available
    load_format: str = "auto"  # auto | dummy (random weights from config.json)
    uds_path: str = "/tmp/tgi-trtllm-shard"  # rank r listens on unix://{uds_path}-{r}, mode 0600
    host: str | None = None  # TCP mode: rank r listens on {host}:{port + r}
    port: int = 50051
    advertise_host: str | None = None  # the host name other services use to reach this shard
    tp_size: int = 0  # 0 = world size / pp_size
    pp_size: int = 1
    block_size: int = 16
    kv_cache_fraction: float = 0.9  # GPU: share of memory free after weights + warmup peak
    kv_cache_tokens: int = 0  # CPU (or override): KV capacity in tokens; 0 = engine default
    cuda_graphs: bool = True
    overlap_decode: bool = True  # CUDA: host one decode step behind the GPU (NativeEngine._decode_overlapped)
    cache_dir: str = ""  # conversion cache ("" = ~/.cache/tgi-trtllm)
    tokenizer_name: str = ""  # trtllm: where generation_config/tokenizer live if not in the engine folder
    max_batch_size: int = 0  # optional caps passed by the launcher; 0 = none
    max_input_tokens: int = 0
    max_total_tokens: int = 0
    scheduler_policy: str = "auto"  # SCHEDULER_POLICIES; used by the TensorRT-LLM engine
    seed: int = 0  # dummy weights seed
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        _check_choice("scheduler_policy", self.scheduler_policy, SCHEDULER_POLICIES)
        if not self.model_id:
            raise ValueError("--model-id is required")
        if self.pp_size < 1 or self.tp_size < 0:
            raise ValueError(
                f"--pp-size must be >= 1 and --tp-size >= 0, got {self.pp_size} and {self.tp_size}"
            )
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"--kv-cache-fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.host is None and len(os.fsencode(self.uds_path)) + 8 > MAX_UDS_PATH_BYTES:
            # 8 bytes leave room for the "-{rank}" suffix.
            raise ValueError(
                f"--uds-path {self.uds_path!r} is too long for a unix socket; use a shorter path"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")

    @property
    def uses_tcp(self) -> bool:
        return self.host is not None

    def listen_address(self, rank: int) -> str:
        """The address rank `rank` binds: unix:///path-r or host:port+r (grpc target syntax)."""
        if self.host is None:
            return f"unix://{self.uds_path}-{rank}"
        return _join_host_port(self.host, self.port + rank)

    def rank_url(self, rank: int, rank_host: str) -> str:
        """The URL other processes dial for rank `rank`.

        `rank_host` is that rank's machine name (from MPI), used in TCP mode when neither an
        advertised host nor a specific listen host is given.
        """
        if self.host is None:
            return self.listen_address(rank)
        host = self.advertise_host or (rank_host if self.host in WILDCARD_HOSTS else self.host)
        return _join_host_port(host, self.port + rank)


def _join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")


def env_name(field_name: str) -> str:
    return "SHARD_" + field_name.upper()


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_str(text: str) -> str | None:
    return text or None


_CONVERTERS: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": parse_bool,
    "str | None": _optional_str,
}


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shard",
        description="One rank of a tgi-trtllm shard world (start it under mpiexec).",
    )
    for f in fields(ShardConfig):
        conv = _CONVERTERS[str(f.type)]
        flag = "--" + f.name.replace("_", "-")
        env_value = env.get(env_name(f.name))
        default = None if f.default is MISSING else f.default
        if env_value is not None:
            try:
                default = conv(env_value)
            except (ValueError, argparse.ArgumentTypeError) as e:
                parser.error(f"{env_name(f.name)}={env_value!r}: {e}")
        help_text = f"(env {env_name(f.name)}; default {default!r})"
        if conv is parse_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=conv, default=default, help=help_text)
    return parser


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ShardConfig:
    """Parses flags (falling back to SHARD_* variables); exits with status 2 on a bad value."""
    parser = build_parser(os.environ if env is None else env)
    ns = parser.parse_args(argv)
    try:
        return ShardConfig(**vars(ns))
    except ValueError as e:
        parser.error(str(e))
