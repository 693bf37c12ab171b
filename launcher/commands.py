"""The command lines the launcher runs: the mpiexec world of shard ranks and the router."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys

from launcher.config import LauncherConfig, LaunchError
from launcher.embedded import embedded_model_path

log = logging.getLogger("launcher")

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
# NVLink multicast fails to initialize on the GPU machines here; harmless elsewhere.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

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
    argv += ["--scheduler-policy", config.scheduler_policy]  # TensorRT-LLM admits itself
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
        "max_decode_steps", "payload_limit", "cors_allow_origin", "validation_workers", "burst_hold_ms",
    ):  # fmt: skip
        argv += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    # The router admits only for paged engines; "auto" is its max_utilization.
    argv += ["--scheduler-policy", "max_utilization" if config.scheduler_policy == "auto" else config.scheduler_policy]
    argv += ["--prefix-caching", "false" if config.disable_prefix_caching else "true"]
    argv += ["--mixed-batches", "true" if config.mixed_batches else "false"]
    return argv


def connect_host(host: str) -> str:
    """Where to dial a server listening on `host` from this machine."""
    if host in ("::", "[::]"):
        return "[::1]"
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def rank0_probe_url(config: LauncherConfig, uds_path: str) -> str:
    if config.shard_host is None:
        return f"unix://{uds_path}-0"
    return f"{connect_host(config.shard_advertise_host or config.shard_host)}:{config.shard_port}"
