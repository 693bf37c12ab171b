"""`tgi-trtllm`: flags (TGI's names, each with its environment fallback) and the start-up sequence.

mode all (default): mpiexec -n WORLD python -m shard ... -> every rank answers Health -> python -m
router ... -> its /health answers 200 -> supervise. mode shards: only the MPI world, on TCP (the
docker-compose shards service). mode router: only the router, pointed at --shard-address.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from launcher.embedded import EmbeddedModelError, embedded_model_path
from launcher.supervisor import (
    ChildExited,
    StartupTimeout,
    StopRequested,
    Supervisor,
    describe_exit,
    http_ok,
    shard_healthy,
    shard_urls,
)

log = logging.getLogger("launcher")

MODES = ("all", "shards", "router")
# Checked here too so a typo fails before any process starts (the shard checks them again).
_CHOICES = {
    "mode": MODES,
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "load_format": ("auto", "dummy"),
    "log_level": ("debug", "info", "warning", "error"),
}
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
# NVLink multicast fails to initialize on the GPU machines here; harmless elsewhere.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
WORLD = "shard world (mpiexec)"  # child names: every message about a child uses them
ROUTER = "router"


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
    max_decode_steps: int = _opt(4, "decode steps per router->shard call while nobody waits")
    max_client_batch_size: int = _opt(4, "inputs one client request may carry")
    payload_limit: int = _opt(2_000_000, "HTTP body limit in bytes")
    api_key: str = _opt(
        "", "require 'Authorization: Bearer <key>'; passed to the router by environment, never logged"
    )
    cors_allow_origin: str = _opt("", "origin allowed by CORS (empty: no CORS headers)")
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


# ---------------------------------------------------------------- command lines


def resolve_model(model_id: str, revision: str) -> str:
    """A local path for the engines: the embedded model, a local path, or a Hub snapshot."""
    if not model_id:
        return embedded_model_path()
    if os.path.exists(model_id):
        if revision:
            log.warning("--revision %s is ignored: %s is a local path", revision, model_id)
        return os.path.abspath(model_id)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=model_id, revision=revision or None)
    except Exception as e:
        raise LaunchError(
            f"--model-id {model_id!r} is not a local path and could not be fetched from the Hub ({e}); "
            "download it first (e.g. `hf download ID --local-dir DIR`) and pass the folder"
        ) from e


def find_mpiexec(explicit: str) -> str:
    if explicit:
        return explicit
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside_python, os.X_OK):
        return beside_python
    found = shutil.which("mpiexec")
    if found is None:
        raise LaunchError("no mpiexec found: install the `mpich` wheel or Open MPI, or pass --mpiexec")
    return found


def is_open_mpi(mpiexec: str) -> bool:
    """Open MPI's mpiexec says "Open MPI" / "OpenRTE" in --version; MPICH's hydra says HYDRA."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = out.stdout + out.stderr
    return "Open MPI" in text or "OpenRTE" in text


def shard_argv(
    config: LauncherConfig, *, model: str, mpiexec: str, open_mpi: bool, uds_path: str
) -> list[str]:
    argv = [mpiexec, "-n", str(config.world_size)]
    if open_mpi:
        if os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        # Open MPI binds each rank to one core by default: the rank's Python and torch threads
        # would then share it. -x forwards the variables to ranks on other hosts.
        argv += ["--bind-to", "none"] + [a for name in MULTICAST_OFF for a in ("-x", name)]
    argv += shlex.split(config.mpi_args)
    argv += [sys.executable, "-m", "shard", "--model-id", model, "--engine", config.engine]
    argv += ["--dtype", config.dtype, "--device", config.device, "--load-format", config.load_format]
    argv += ["--tp-size", str(config.num_shard), "--pp-size", str(config.pipeline_parallel_size)]
    argv += ["--block-size", str(config.block_size), "--kv-cache-fraction", str(config.kv_cache_fraction)]
    argv += ["--kv-cache-tokens", str(config.kv_cache_tokens)]
    argv += ["--cuda-graphs" if config.cuda_graphs else "--no-cuda-graphs"]
    argv += ["--cache-dir", config.cache_dir, "--tokenizer-name", config.tokenizer_name]
    argv += [
        "--max-batch-size",
        str(config.max_batch_size),
        "--max-input-tokens",
        str(config.max_input_tokens),
    ]
    argv += ["--max-total-tokens", str(config.max_total_tokens), "--log-level", config.log_level]
    if config.shard_host is not None:
        argv += ["--host", config.shard_host, "--port", str(config.shard_port)]
        if config.shard_advertise_host:
            argv += ["--advertise-host", config.shard_advertise_host]
    else:
        argv += ["--uds-path", uds_path]
    return argv


def router_argv(config: LauncherConfig, *, master_url: str, tokenizer: str, model_name: str) -> list[str]:
    argv = [sys.executable, "-m", "router", "--master-shard-uds-path", master_url]
    argv += ["--hostname", config.hostname, "--port", str(config.port)]
    argv += ["--tokenizer-name", tokenizer, "--model-id", model_name, "--cache-dir", config.cache_dir]
    for name in (
        "max_input_tokens", "max_total_tokens", "max_batch_prefill_tokens", "max_batch_total_tokens",
        "max_batch_size", "max_concurrent_requests", "max_best_of", "max_stop_sequences",
        "max_top_n_tokens", "max_client_batch_size", "waiting_served_ratio", "max_waiting_tokens",
        "max_decode_steps", "payload_limit", "cors_allow_origin",
    ):  # fmt: skip
        argv += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    argv += ["--prefix-caching", "false" if config.disable_prefix_caching else "true"]
    return argv


def _connect_host(host: str) -> str:
    """Where to dial a server listening on `host` from this machine."""
    if host in ("::", "[::]"):
        return "[::1]"
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def rank0_probe_url(config: LauncherConfig, uds_path: str) -> str:
    if config.shard_host is None:
        return f"unix://{uds_path}-0"
    return f"{_connect_host(config.shard_advertise_host or config.shard_host)}:{config.shard_port}"


# ---------------------------------------------------------------- start-up and supervision


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="[launcher] %(asctime)s %(levelname)s: %(message)s",
        force=True,
    )


def shard_threads_env(config: LauncherConfig, env: Mapping[str, str]) -> dict[str, str]:
    """OMP_NUM_THREADS for the ranks: this machine's cores shared evenly, unless the user set it or
    the world spans machines (--mpi-args with a hostfile: ranks per machine unknown here; the shard
    then sizes its threads itself, shard/dist.py).

    OpenMP must see it at start-up. Under mpiexec it otherwise starts at one thread, and raising it
    later (torch.set_num_threads, the shard's fallback) left a batch-1 decode step at 65.6 ms
    against 56.6 ms with the variable set (SmolLM2-135M, 2-core CI machine, through HTTP)."""
    if "OMP_NUM_THREADS" in env or config.mpi_args.strip():
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // config.world_size))}


def start_shards(
    sup: Supervisor, config: LauncherConfig, *, model: str, uds_path: str, deadline: float
) -> list[str]:
    """Starts the MPI world and waits until every rank answers Health; returns the rank URLs."""
    mpiexec = find_mpiexec(config.mpiexec)
    argv = shard_argv(config, model=model, mpiexec=mpiexec, open_mpi=is_open_mpi(mpiexec), uds_path=uds_path)
    log.info("starting %d shard rank(s): %s", config.world_size, shlex.join(argv))
    sup.start(WORLD, argv, {**MULTICAST_OFF, **shard_threads_env(config, os.environ), **os.environ})
    n = config.world_size
    rank0 = rank0_probe_url(config, uds_path)
    sup.wait_until(
        lambda: shard_healthy(rank0), what=f"shard 1/{n} at {rank0}", timeout_s=deadline - time.monotonic()
    )
    urls = shard_urls(rank0)
    if urls is None or len(urls) != n:
        raise LaunchError(f"rank 0 at {rank0} lists shards {urls}, expected {n}")
    for rank, url in enumerate(urls[1:], start=1):
        sup.wait_until(
            lambda url=url: shard_healthy(url),
            what=f"shard {rank + 1}/{n} at {url}",
            timeout_s=deadline - time.monotonic(),
        )
    log.info("all %d shard(s) ready: %s", n, " ".join(urls))
    return urls


def start_router(
    sup: Supervisor, config: LauncherConfig, *, master_url: str, tokenizer: str, model_name: str
) -> None:
    argv = router_argv(config, master_url=master_url, tokenizer=tokenizer, model_name=model_name)
    log.info("starting router: %s", shlex.join(argv))
    # The API key travels by environment (API_KEY, the router's fallback), not argv: `ps` shows argv.
    sup.start(ROUTER, argv, {**os.environ, "API_KEY": config.api_key, "LOG_LEVEL": config.log_level.upper()})
    health = f"http://{_connect_host(config.hostname)}:{config.port}/health"
    sup.wait_until(lambda: http_ok(health), what=f"router at {health}", timeout_s=config.startup_timeout)
    log.info("ready at http://%s:%d", config.hostname, config.port)


def _remove_sockets(config: LauncherConfig, socket_dir: str | None, uds_path: str) -> None:
    if socket_dir is not None:
        shutil.rmtree(socket_dir, ignore_errors=True)
    elif config.shard_host is None and config.mode != "router":
        for rank in range(config.world_size):  # leftovers of ranks that did not stop cleanly
            try:
                os.unlink(f"{uds_path}-{rank}")
            except FileNotFoundError:
                pass


def run(config: LauncherConfig, sup: Supervisor) -> None:
    """Starts what config.mode asks for and supervises it; returns only by exception."""
    deadline = time.monotonic() + config.startup_timeout
    if config.mode == "router":  # the router needs only a tokenizer
        model = tokenizer = resolve_model(config.tokenizer_name or config.model_id, config.revision)
        master_url = config.shard_address
    else:
        model = resolve_model(config.model_id, config.revision)
        tokenizer = config.tokenizer_name or model
        master_url = start_shards(
            sup, config, model=model, uds_path=config.shard_uds_path, deadline=deadline
        )[0]
    if config.mode != "shards":
        start_router(
            sup, config, master_url=master_url, tokenizer=tokenizer, model_name=config.model_id or model
        )
    else:
        log.info("shards ready; supervising them (no router in --mode shards)")
    sup.supervise()


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 after SIGINT/SIGTERM, 1 when a child exits or start-up fails, 2 for bad flags."""
    config = parse_args(argv)
    setup_logging(config.log_level)
    socket_dir = None
    if config.mode != "router" and config.shard_host is None and not config.shard_uds_path:
        socket_dir = tempfile.mkdtemp(prefix=f"tgi-trtllm-{os.getpid()}-")  # mode 0700
        config = dataclasses.replace(config, shard_uds_path=os.path.join(socket_dir, "shard"))
    sup = Supervisor()
    sup.install_signal_handlers()
    status = 1
    failed = None  # the child whose exit ended the run
    try:
        run(config, sup)
    except StopRequested:
        log.info("%s received; shutting down", sup.stop_signal)
        status = 0
    except ChildExited as e:
        failed = e.child
        others = [c.name for c in sup.children if c.running]
        log.error("%s; stopping %s", e, ", ".join(others) or "nothing (no other child runs)")
    except (LaunchError, EmbeddedModelError, StartupTimeout) as e:
        log.error("%s", e)
    finally:
        sup.stop_all()
        _remove_sockets(config, socket_dir, config.shard_uds_path)
    for child in sup.children:
        if child is not failed:
            log.info("%s %s", child.name, describe_exit(child.popen.returncode))
    return status
