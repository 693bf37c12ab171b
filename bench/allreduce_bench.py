"""The tensor-parallel reduce at decode sizes on 2 or more GPUs, as the fused forward runs it:
NCCL's all-reduce followed by the add + RMSNorm kernel, against the one fused kernel of
shard/native/kernels/lamport.py (fast_allreduce.py), both replayed from a CUDA graph.

    python3 -m bench.allreduce_bench [--world 2] [--out allreduce.json]

For rows M of a (M, 4096) bf16 hidden state (8 KiB at M = 1), captures 64 reduce + norm calls (one
decode token of Llama-3.1-8B: two per layer) in one graph and reports microseconds per call,
median of the replays. Checks the results first: the fused kernel must give exactly the float32
sum in rank order, rounded once, then norm.add_rms_norm; at two ranks that is also NCCL's result
bit for bit. At more ranks NCCL rounds its partial sums to bf16 along its ring, so its largest
difference from that sum is reported, not required to be zero.
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
                      TORCH_SYMM_MEM_DISABLE_MULTICAST="1", SHARD_FUSED_ALLREDUCE="1")  # fmt: skip
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    from shard.native.fast_allreduce import RowParallelReduce

    nccl = RowParallelReduce(None)
    fused = RowParallelReduce(None)
    assert fused.enable_fused(device, torch.bfloat16, HIDDEN), "fused set-up failed"
    from shard.native.kernels.norm import add_rms_norm

    weight = torch.rand(HIDDEN, dtype=torch.bfloat16, device=device) + 0.5
    results, nccl_diff = [], {}
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
        # The exact result: the two calls above each added sum(parts) to the residual, rounded.
        g = torch.Generator(device="cpu").manual_seed(m)
        parts = torch.randn(world, m, HIDDEN, generator=g).to(torch.bfloat16)
        res_want = torch.randn(m, HIDDEN, generator=g).to(torch.bfloat16).to(device)
        total = parts[0].float()
        for r in range(1, world):
            total = total + parts[r].float()  # rank order, as the kernel sums
        total = total.to(torch.bfloat16).to(device)
        for _ in range(2):
            want, _ = add_rms_norm(total, res_want, weight, 1e-5)
        assert torch.equal(rb, res_want) and torch.equal(b, want), f"M={m}: fused differs from the rank-order sum"
        nccl_diff[m] = max((ra.float() - rb.float()).abs().max().item(), (a.float() - b.float()).abs().max().item())
        if world == 2:
            assert nccl_diff[m] == 0, f"M={m}: fused differs from NCCL + norm"
    if rank == 0:
        info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "world": world}
        with open(out, "w") as f:
            json.dump({"info": info, "results": results, "nccl_max_abs_diff": nccl_diff}, f, indent=1)
        print(f"{world} ranks; fused = the rank-order sum exactly; NCCL + norm max |diff| by rows: {nccl_diff}")
        for r in results:
            print(f"M={r['rows']:3d} ({r['bytes'] // 1024:4d} KiB) {r['method']:9s} {r['us']:7.2f} us per reduce + norm")
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="allreduce.json")
    ap.add_argument("--world", type=int, default=2, help="ranks, one GPU each")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port, args.out), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
