"""MPI + torch.distributed bootstrap of one shard rank.

mpiexec gives every rank its place (MPI.COMM_WORLD); torch.distributed carries the tensors (gloo on
CPU, NCCL on CUDA). Rank 0 picks a free TCP port for torch's rendezvous and broadcasts it over MPI,
so no port has to be configured.

Layout: rank = pp_rank * tp_size + tp_rank. The ranks of one pipeline stage form a tensor-parallel
group; ranks with the same tp_rank across stages form a pipeline group.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed

from shard.config import ShardConfig
from shard.engine.base import EngineConfigError

log = logging.getLogger(__name__)

# The GPU machines here need NVLink multicast off (NVLS / symmetric memory fail to initialize).
_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int  # rank among the ranks on this machine; picks the GPU
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    device: torch.device
    backend: str  # "gloo" | "nccl": the process group's backend (chosen even when world_size == 1)
    # None when the group would hold one rank only (no collectives needed).
    tp_group: torch.distributed.ProcessGroup | None = None
    pp_group: torch.distributed.ProcessGroup | None = None
    pp_prev_rank: int | None = None  # global rank of the previous pipeline stage (same tp_rank)
    pp_next_rank: int | None = None
    hostnames: tuple[str, ...] = ()  # machine name of every rank, rank order

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def tp_ranks(self) -> tuple[int, ...]:
        """Global ranks of my tensor-parallel group."""
        return tuple(self.pp_rank * self.tp_size + t for t in range(self.tp_size))

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> DistContext:
        """A one-rank context without MPI or torch.distributed (tests, benchmarks, notebooks)."""
        device = torch.device(device)
        return cls(
            rank=0,
            world_size=1,
            local_rank=0,
            tp_rank=0,
            tp_size=1,
            pp_rank=0,
            pp_size=1,
            device=device,
            backend="nccl" if device.type == "cuda" else "gloo",
            hostnames=(socket.gethostname(),),
        )


def mpi_rank_and_size() -> tuple[int, int]:
    """Initializes MPI (on first import of mpi4py.MPI) and returns (rank, world size)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def resolve_layout(config: ShardConfig, world_size: int) -> tuple[int, int]:
    """(tp_size, pp_size) for this world; raises EngineConfigError when they do not multiply out."""
    pp = config.pp_size
    if world_size % pp:
        raise EngineConfigError(
            f"the MPI world has {world_size} ranks, not a multiple of --pp-size {pp}; "
            "start world = tp x pp ranks (launcher: --num-shard x --pipeline-parallel-size)"
        )
    tp = config.tp_size or world_size // pp
    if tp * pp != world_size:
        raise EngineConfigError(
            f"--tp-size {tp} x --pp-size {pp} = {tp * pp} ranks, but the MPI world has {world_size}; "
            f"start mpiexec -n {tp * pp}"
        )
    return tp, pp


def _pick_device(config: ShardConfig, local_rank: int) -> torch.device:
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EngineConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise EngineConfigError(
            f"local rank {local_rank} needs GPU {local_rank}, but only {count} are visible on this machine; "
            "start fewer ranks per machine (or fix CUDA_VISIBLE_DEVICES)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _rendezvous_address(comm, rank: int, single_node: bool) -> tuple[str, int]:
    """Rank 0 picks a free port; everyone receives (host, port) over MPI.

    The port is closed again before torch's store binds it; the window is tiny and each launch
    picks a fresh port. MASTER_ADDR / MASTER_PORT in the environment override the choice.
    """
    address: tuple[str, int] | None = None
    if rank == 0:
        host = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if single_node else socket.gethostbyname(socket.getfqdn())
        )
        port = int(os.environ.get("MASTER_PORT", "0"))
        if port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("" if not single_node else "127.0.0.1", 0))
                port = s.getsockname()[1]
        address = (host, port)
    return comm.bcast(address, root=0)


def _new_groups(
    tp: int, pp: int, rank: int
) -> tuple[torch.distributed.ProcessGroup | None, torch.distributed.ProcessGroup | None]:
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    tp_group = pp_group = None
    if tp > 1:
        for stage in range(pp):
            ranks = [stage * tp + t for t in range(tp)]
            group = torch.distributed.new_group(ranks)
            if rank in ranks:
                tp_group = group
    if pp > 1:
        for t in range(tp):
            ranks = [stage * tp + t for stage in range(pp)]
            group = torch.distributed.new_group(ranks)
            if rank in ranks:
                pp_group = group
    return tp_group, pp_group


def cpu_threads_per_rank(local_ranks: int, env: dict[str, str] | None = None) -> int:
    """Intra-op threads for one CPU rank: $OMP_NUM_THREADS when set, else this process's cores
    shared evenly among the ranks on this machine.

    Why it is set at all: under mpiexec (MPICH hydra) OpenMP starts with one thread per process
    (omp_get_max_threads() = 1 even with both cores allowed, measured on the 2-core CI machine), so a
    lone CPU rank would compute on one core. Two ranks on two cores get one thread each: more would
    oversubscribe the cores and stall every OpenMP barrier."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_ranks))


def init_distributed(config: ShardConfig) -> DistContext:
    """Joins the MPI world and, when it has more than one rank, torch.distributed.

    Raises EngineConfigError when the world does not match --tp-size x --pp-size or the GPU is missing.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    hostnames = tuple(comm.allgather(socket.gethostname()))

    tp, pp = resolve_layout(config, world_size)
    device = _pick_device(config, local_rank)
    if device.type == "cpu":
        threads = cpu_threads_per_rank(local_size)
        torch.set_num_threads(threads)
        log.info("CPU: %d torch threads for this rank (%d ranks on this machine)", threads, local_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    tp_group = pp_group = None
    if world_size > 1:
        for key, value in _MULTICAST_OFF.items():
            os.environ.setdefault(key, value)
        host, port = _rendezvous_address(comm, rank, single_node=local_size == world_size)
        log.info(
            "joining torch.distributed (%s) at tcp://%s:%d as rank %d/%d",
            backend,
            host,
            port,
            rank,
            world_size,
        )
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{host}:{port}",
            rank=rank,
            world_size=world_size,
            device_id=device if device.type == "cuda" else None,
        )
        tp_group, pp_group = _new_groups(tp, pp, rank)

    pp_rank, tp_rank = divmod(rank, tp)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp_rank=tp_rank,
        tp_size=tp,
        pp_rank=pp_rank,
        pp_size=pp,
        device=device,
        backend=backend,
        tp_group=tp_group,
        pp_group=pp_group,
        pp_prev_rank=rank - tp if pp_rank > 0 else None,
        pp_next_rank=rank + tp if pp_rank < pp - 1 else None,
        hostnames=hostnames,
    )


def close_distributed(dist: DistContext) -> None:
    """Leaves torch.distributed (no barrier: a peer may already be gone). MPI finalizes at exit."""
    if dist.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
