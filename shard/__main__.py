"""`python -m shard [flags]`: one rank of the shard world; start N of them with mpiexec -n N.

Exit status: 0 after a graceful stop (SIGTERM/SIGINT), 2 for a configuration the engine refuses,
1 for any other start-up failure. mpiexec stops the other ranks when one exits non-zero.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import sys
import time
from collections.abc import Sequence

from shard.config import ShardConfig, parse_args
from shard.dist import close_distributed, init_distributed, mpi_rank_and_size
from shard.engine.base import EngineConfigError
from shard.engine.registry import create_engine
from shard.server import engine_thread, serve

log = logging.getLogger("shard")


def setup_logging(rank: int, level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format=f"[shard {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def run(config: ShardConfig) -> int:
    rank, world_size = mpi_rank_and_size()
    setup_logging(rank, config.log_level)
    # `kill -USR1 <pid>` prints every thread's Python stack to stderr: where a stuck rank waits
    # (a collective, a GPU sync) without stopping it
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    started = time.monotonic()
    try:
        log.info("starting rank %d/%d: engine %s, model %s", rank, world_size, config.engine, config.model_id)
        dist = init_distributed(config)
        log.info(
            "tp %d/%d, pp %d/%d on %s", dist.tp_rank, dist.tp_size, dist.pp_rank, dist.pp_size, dist.device
        )
        worker = engine_thread()  # builds the engine and then runs every call on it (server.py)
        engine = worker.submit(create_engine, config, dist).result()
    except EngineConfigError as e:
        log.error("cannot start: %s", e)
        return 2
    except Exception:
        log.exception("start-up failed")
        return 1
    log.info("engine ready after %.1f s", time.monotonic() - started)
    try:
        asyncio.run(serve(engine, config=config, dist=dist, worker=worker))
    except OSError as e:
        log.error("cannot serve: %s", e)
        return 1
    finally:
        close_distributed(dist)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
