"""The tensor-parallel reduce at decode sizes on 2 GPUs, as the fused forward runs it: NCCL's
all-reduce followed by the add + RMSNorm kernel, against the one fused kernel of
shard/native/kernels/lamport.py (fast_allreduce.py), both replayed from a CUDA graph.

    python3 -m bench.allreduce_bench [--out allreduce.json]

For rows M of a (M, 4096) bf16 hidden state (8 KiB at M = 1), captures 64 reduce + norm calls (one
decode token of Llama-3.1-8B: two per layer) in one graph and reports microseconds per call,
median of the replays. Checks that both give the same result first.
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

ROWS = (1, 8, 64, 128)
PER_GRAPH = 64
HIDDEN = 4096


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                      TORCH_SYMM_MEM_DISABLE_MULTICAST="1")  # fmt: skip
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    from shard.native.fast_allreduce import RowParallelReduce

    nccl = RowParallelReduce(None)
    fused = RowParallelReduce(None)
    assert fused.enable_fused(device, torch.bfloat16, HIDDEN), "fused set-up failed"
    weight = torch.rand(HIDDEN, dtype=torch.bfloat16, device=device) + 0.5
    results = []
    for m in ROWS:
        outs = {}
        for name, reduce in (("nccl+norm", nccl), ("fused", fused)):
            g = torch.Generator(device="cpu").manual_seed(m)
            parts = torch.randn(world, m, HIDDEN, generator=g).to(torch.bfloat16)
            x = parts[rank].to(device)
            res0 = torch.randn(m, HIDDEN, generator=g).to(torch.bfloat16).to(device)
            res = res0.clone()

            def calls(n: int, reduce=reduce, x=x, res=res, m=m, fresh: bool = False) -> torch.Tensor:
                with reduce.forward(m, torch.bfloat16) as add_norm:
                    for _ in range(n):
                        # The hook sums NCCL's input in place: fresh partials for the check only (a
                        # timed graph leaves the copy out; the values it sums then do not matter).
                        xi = x.clone() if fresh else x
                        reduce(xi)
                        y, _ = add_norm(xi, res, weight, 1e-5)
                return y

            outs[name] = (calls(2, fresh=True), res.clone())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                calls(PER_GRAPH)
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
            results.append({"rows": m, "bytes": m * HIDDEN * 2, "method": name, "us": times[len(times) // 2]})
        (a, ra), (b, rb) = outs["nccl+norm"], outs["fused"]
        assert torch.equal(ra, rb) and torch.equal(a, b), f"M={m}: fused differs from NCCL + norm"
    if rank == 0:
        info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "world": world}
        with open(out, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
        for r in results:
            print(f"M={r['rows']:3d} ({r['bytes'] // 1024:4d} KiB) {r['method']:9s} {r['us']:7.2f} us per reduce + norm")
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="allreduce.json")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args.out), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
