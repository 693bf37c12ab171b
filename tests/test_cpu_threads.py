"""How many intra-op threads a CPU rank gets (shard/dist.py) and what the launcher tells mpiexec."""

from __future__ import annotations

import os

from launcher.cli import parse_args, shard_threads_env
from shard.dist import cpu_threads_per_rank


def test_ranks_share_the_cores_and_omp_num_threads_wins() -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads_per_rank(1, env={}) == cores
    assert cpu_threads_per_rank(2, env={}) == max(1, cores // 2)
    assert cpu_threads_per_rank(cores * 4, env={}) == 1  # never zero
    assert cpu_threads_per_rank(1, env={"OMP_NUM_THREADS": "3"}) == 3
    assert cpu_threads_per_rank(1, env={"OMP_NUM_THREADS": "junk"}) == cores  # ignored, not a crash


def test_launcher_sets_omp_num_threads_only_for_a_one_machine_world() -> None:
    cores = len(os.sched_getaffinity(0))
    two = parse_args(["--num-shard", "2"], env={})
    assert shard_threads_env(two, {}) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    assert shard_threads_env(two, {"OMP_NUM_THREADS": "7"}) == {}  # the user's choice stays
    hostfile = parse_args(["--num-shard", "2", "--mpi-args", "-f hosts"], env={})
    assert shard_threads_env(hostfile, {}) == {}
