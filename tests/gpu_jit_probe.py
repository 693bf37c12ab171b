"""GPU probe: does serving compile anything after warmup? Run in a fresh process (a Triton kernel
compiled earlier in the same process would hide a gap in warmup):

    python3 -m tests.gpu_jit_probe [NUM_LAYERS]

Builds the Llama-3.1-8B-shape engine (bf16, dummy weights, CUDA graphs, Triton attention), warms
it up as the shard does, then listens to Triton's compilations (knobs.compilation.listener fires
on every in-process cache miss, whether the on-disk cache then has the kernel or not) while it
serves batches of the shapes serving meets: prefills of 1..33 sequences and assorted lengths,
with and without a cached prefix, decode at many batch sizes, multi-step and mixed calls, sampled
and greedy rows. Prints one JSON object: {"events": [[kernel, cache_hit, specialization, case],
...], "warmup": the same for what warmup compiled, "seconds_per_case": {...}}.

Why: a new specialization compiles on the request path. Triton specializes integer arguments
that are 1 or multiples of 16 (and pointers by alignment), so a batch of exactly 16 prompts can
compile a kernel variant warmup never launched; on the H100 that stalled a prefill for ~2 s
(bench/results/gpu-h100-20261127-session7/matrix, 128/128 at concurrency 16 through HTTP).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from shard.engine.types import NewRequest, SamplingParams, StoppingParams, WarmupSpec
from shard.native.attention import get_attention_backend
from shard.native.engine import NativeEngine, RuntimeOptions
from shard.native.loader import load_model
from shard.native.tp import TPGroup

BS = 16


def build(num_layers: int) -> NativeEngine:
    import tempfile
    from pathlib import Path

    d = json.loads(Path("shard/native/configs/llama-3.1-8b.json").read_text())
    d["num_hidden_layers"] = num_layers
    folder = Path(tempfile.mkdtemp(prefix="jit-probe-"))
    (folder / "config.json").write_text(json.dumps(d))
    cuda = torch.device("cuda")
    model, mc = load_model(str(folder), dtype=torch.bfloat16, device=cuda, tp=TPGroup.single(),
                           load_format="dummy", attention=get_attention_backend("triton"), seed=0)  # fmt: skip
    eng = NativeEngine(
        model=model, model_config=mc, device=cuda, dtype=torch.bfloat16,
        options=RuntimeOptions(model_id="jit-probe", block_size=BS, cuda_graphs=True),  # KV sized as served
    )  # fmt: skip
    eng.warmup(WarmupSpec(max_input_tokens=2048, max_total_tokens=4096, max_batch_prefill_tokens=8192,
                          max_batch_size=256))  # fmt: skip
    return eng


class Requests:
    """Fresh request ids and KV blocks; blocks are reused once the engine forgets the requests."""

    def __init__(self) -> None:
        self.next_id = 1
        self.next_block = 0

    def make(
        self, length: int, out: int, *, sampled: bool = False, prefix_of: NewRequest | None = None
    ) -> NewRequest:
        g = torch.Generator().manual_seed(self.next_id)
        ids = torch.randint(0, 128000, (length,), generator=g).tolist()
        blocks: list[int] = []
        prefix_len = 0
        if prefix_of is not None:  # shares the other request's first full blocks (a prefix-cache hit)
            prefix_len = (len(prefix_of.input_ids) - 1) // BS * BS
            ids[:prefix_len] = prefix_of.input_ids[:prefix_len]
            blocks = list(prefix_of.blocks[: prefix_len // BS])
        need = -(-(length + out + 1) // BS) - len(blocks)
        blocks += range(self.next_block, self.next_block + need)
        self.next_block += need
        sampling = (
            SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, seed=self.next_id)
            if sampled
            else SamplingParams()
        )
        r = NewRequest(id=self.next_id, input_ids=tuple(ids), sampling=sampling,
                       stopping=StoppingParams(max_new_tokens=out, ignore_eos_token=True),
                       blocks=tuple(blocks), prefix_len=prefix_len)  # fmt: skip
        self.next_id += 1
        return r

    def reset(self, eng: NativeEngine) -> None:
        eng.clear()
        self.next_block = 0


def cases(eng: NativeEngine, reqs: Requests):
    """(name, thunk) pairs; each thunk serves one situation to its end."""

    def run(batch: list[NewRequest], steps: int = 4, joiners: list[NewRequest] = ()) -> None:
        eng.prefill(batch)
        eng.decode({}, 1)
        for j in joiners:  # join through a mixed prefill (the running rows decode in it)
            eng.prefill([j], decode_running={})
        while eng.seqs:
            eng.decode({}, steps)
        torch.cuda.synchronize()
        reqs.reset(eng)

    for n in (1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 64, 65):
        yield f"prefill {n} x 64 tokens", lambda n=n: run([reqs.make(64, 6) for _ in range(n)])
    for length in (1, 15, 16, 17, 100, 128, 1000, 2048):
        yield f"prefill 1 x {length}", lambda length=length: run([reqs.make(length, 3)])
        yield f"prefill 2 x {length}", lambda length=length: run([reqs.make(length, 3) for _ in range(2)])
    for n in (16, 64):
        yield (
            f"prefill {n} x 128 then 1-step calls",
            lambda n=n: run([reqs.make(128, 9) for _ in range(n)], steps=1),
        )

    def prefix_hit() -> None:
        first = reqs.make(200, 2)
        eng.prefill([first])
        eng.prefill([reqs.make(260, 2, prefix_of=first) for _ in range(3)])
        while eng.seqs:
            eng.decode({}, 4)
        reqs.reset(eng)

    yield "cached prefix", prefix_hit
    yield "sampled rows", lambda: run([reqs.make(64, 5, sampled=True) for _ in range(16)])
    yield (
        "mixed joins",
        lambda: run([reqs.make(64, 20) for _ in range(15)], joiners=[reqs.make(100, 3), reqs.make(7, 3)]),
    )
    for n in (1, 5, 16, 48, 100, 200, 256):
        yield f"decode batch {n}", lambda n=n: run([reqs.make(20, 8) for _ in range(n)], steps=8)


def main() -> int:
    import triton

    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    events: list[list] = []  # after warmup
    warmup: list[list] = []  # what warmup compiled, with its specializations (for a failure's message)
    current = ["warmup"]

    def listener(*, src, metadata, metadata_group, times, cache_hit) -> None:
        # attrs: the specialization (e.g. {(3,): [['tt.divisibility', 16]]}: argument 3 is a
        # multiple of 16), the part of the cache key that a new batch shape changes
        spec = f"{getattr(src, 'signature', '')} {getattr(src, 'attrs', '')}"
        (warmup if current[0] == "warmup" else events).append(
            [getattr(src, "name", repr(src)), bool(cache_hit), spec, current[0]]
        )

    triton.knobs.compilation.listener = listener
    eng = build(layers)
    reqs = Requests()
    timings = {}
    for name, thunk in cases(eng, reqs):
        current[0] = name
        t0 = time.perf_counter()
        thunk()
        timings[name] = round(time.perf_counter() - t0, 3)
    print(json.dumps({"events": events, "seconds_per_case": timings, "warmup": warmup}, default=repr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
