"""`tgi-trtllm`: the start-up sequence and supervision (flags: config.py; command lines: commands.py).

mode all (default): mpiexec -n WORLD python -m shard ... -> every rank answers Health -> python -m
router ... -> its /health answers 200 -> supervise. mode shards: only the MPI world, on TCP (the
docker-compose shards service). mode router: only the router, pointed at --shard-address.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

from launcher.commands import (  # re-exported: tests and scripts use cli.*
    MULTICAST_OFF,
    connect_host,
    find_mpiexec,
    is_open_mpi,  # noqa: F401
    rank0_probe_url,
    resolve_model,
    router_argv,
    shard_argv,
)
from launcher.config import LauncherConfig, LaunchError, env_name, parse_args  # noqa: F401
from launcher.embedded import EmbeddedModelError
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

WORLD = "shard world (mpiexec)"  # child names: every message about a child uses them
ROUTER = "router"


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
    health = f"http://{connect_host(config.hostname)}:{config.port}/health"
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
