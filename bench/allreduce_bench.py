"""The tensor-parallel all-reduce at decode sizes on 2 GPUs: NCCL against the one-shot
symmetric-memory path of shard/native/fast_allreduce.py, both replayed from a CUDA graph as the
engine's decode step runs them.

    python3 -m bench.allreduce_bench [--out allreduce.json]

For rows M of a (M, 4096) bf16 hidden state (8 KiB at M = 1), captures 64 in-place all-reduces
(one decode token of Llama-3.1-8B: two per layer) in one graph and reports microseconds per
all-reduce, median of the replays. Checks the sums first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROWS = (1, 8, 64)
PER_GRAPH = 64


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                      TORCH_SYMM_MEM_DISABLE_MULTICAST="1")  # fmt: skip
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    from shard.native.fast_allreduce import RowParallelReduce

    nccl = RowParallelReduce(None)
    one_shot = RowParallelReduce(None)
    assert one_shot.enable_one_shot(device, torch.bfloat16), "one-shot set-up failed"
    results = []
    for m in ROWS:
        for name, reduce in (("nccl", nccl), ("one_shot", one_shot)):
            x = torch.full((m, 4096), float(rank + 1), dtype=torch.bfloat16, device=device)
            reduce(x)
            assert torch.all(x == world * (world + 1) / 2), name
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(PER_GRAPH):
                    reduce(x)
            times = []
            for _ in range(30):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                dist.barrier()
                torch.cuda.synchronize()
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / PER_GRAPH)
            times.sort()
            results.append({"rows": m, "bytes": x.numel() * 2, "method": name, "us": times[len(times) // 2]})
    if rank == 0:
        info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "world": world}
        with open(out, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
        for r in results:
            print(f"M={r['rows']:3d} ({r['bytes'] // 1024:4d} KiB) {r['method']:9s} {r['us']:7.2f} us per all-reduce")
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="allreduce.json")
    args = ap.parse_args()
    os.environ["SHARD_ONE_SHOT_ALLREDUCE"] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args.out), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
