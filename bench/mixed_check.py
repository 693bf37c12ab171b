"""Localizes a mixed-batch mismatch on the GPU: Llama-3.1-8B shapes (4 layers, dummy weights,
bf16), one request running, others joining through mixed prefills. Prints, per mixed forward and
layer, the Triton attention's error against the reference backend (decode rows and prefill rows
apart), compares the greedy tokens with the same joins done as plain prefills, and gives each
pattern's teacher-forced gaps against transformers in fp32 (tests/test_gpu_engine.py's check).

    python3 -m bench.mixed_check
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from shard.engine.types import NewRequest, SamplingParams, StoppingParams, WarmupSpec
from shard.native.attention import ReferenceAttention, get_attention_backend
from shard.native.engine import NativeEngine, RuntimeOptions
from shard.native.kernels import triton_attention as ta
from shard.native.loader import load_model
from shard.native.tp import TPGroup

BS = 16
CUDA = torch.device("cuda")


def main() -> None:
    d = json.loads(Path("shard/native/configs/llama-3.1-8b.json").read_text())
    d["num_hidden_layers"] = 4
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(d))
    model, mc = load_model(str(folder), dtype=torch.bfloat16, device=CUDA, tp=TPGroup.single(), load_format="dummy",
                           attention=get_attention_backend("triton"), seed=0)
    errors: list[str] = []
    orig = ta.TritonAttention.forward

    def checked(self, q, k, v, k_cache, v_cache, meta, scale):  # noqa: ANN001, ANN202
        out = orig(self, q, k, v, k_cache, v_cache, meta, scale)
        if not meta.num_decode:
            return out
        ref = ReferenceAttention()._prefill(q, k, v, k_cache, v_cache, meta, scale)
        n = meta.num_decode

        def rel(a, b):  # noqa: ANN001, ANN202
            return ((a.float() - b.float()).norm() / b.float().norm()).item()

        errors.append(f"decode rows {n}: {rel(out[:n], ref[:n]):.2e}  prefill rows: {rel(out[n:], ref[n:]):.2e}")
        return out

    ta.TritonAttention.forward = checked
    import transformers

    from shard.native.config import ModelConfig
    from shard.native.loader import dummy_state_dict

    mc32 = ModelConfig.from_hf_dict(d)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**mc32.to_hf_dict()), dtype=torch.float32
    ).to(CUDA).eval()
    hf.load_state_dict(dummy_state_dict(mc32, seed=0, dtype=torch.float32, device="cuda"), strict=False)

    def gaps(p: list[int], o: list[int]) -> list[float]:
        with torch.inference_mode():
            logits = hf(torch.tensor([p + o], device=CUDA)).logits[0, len(p) - 1 : -1].float()
        picked = logits.gather(1, torch.tensor(o, device=CUDA)[:, None]).squeeze(1)
        return [round(x, 2) for x in (logits.max(-1).values - picked).tolist()]

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128000, (n,), generator=g).tolist() for n in (1000, 37, 260)]
    for graphs in (True,):  # graphs=False gave the same (first device run)
        results = {}
        for mixed in (True, False):
            eng = NativeEngine(model=model, model_config=mc, device=CUDA, dtype=torch.bfloat16,
                               options=RuntimeOptions(model_id="x", block_size=BS, kv_cache_tokens=1 << 15,
                                                      cuda_graphs=graphs))
            eng.warmup(WarmupSpec(max_input_tokens=1024, max_total_tokens=2048, max_batch_prefill_tokens=4096,
                                  max_batch_size=64))
            nxt, reqs = 0, []
            for i, p in enumerate(prompts):
                k = -(-(len(p) + 17) // BS)
                reqs.append(NewRequest(id=i + 1, input_ids=tuple(p), sampling=SamplingParams(),
                                       stopping=StoppingParams(max_new_tokens=16, ignore_eos_token=True),
                                       blocks=tuple(range(nxt, nxt + k))))
                nxt += k
            out: dict[int, list[int]] = {r.id: [] for r in reqs}
            res = [eng.prefill(reqs[:1]), eng.decode({}, 4)]
            for r in reqs[1:]:
                res.append(eng.prefill([r], decode_running={}) if mixed else eng.prefill([r]))
            for x in res:
                for gen in [*x.decode_generations, *x.generations]:
                    out[gen.request_id].append(gen.token_id)
            while eng.seqs:
                for gen in eng.decode({}, 4).generations:
                    out[gen.request_id].append(gen.token_id)
            results[mixed] = out
            eng.shutdown()
        print(f"graphs={graphs}: attention errors in mixed forwards (per layer):")
        for e in errors:
            print("  ", e)
        errors.clear()
        for mixed, out in results.items():
            for rid, p in enumerate(prompts, 1):
                print(f"  mixed={mixed} request {rid} teacher-forced gaps: {gaps(p, out[rid])}")
        for rid in results[True]:
            a, b = results[True][rid], results[False][rid]
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            print(f"  request {rid}: mixed == plain joins: {a == b}; first difference at {first}; "
                  f"lengths {len(a)} {len(b)}")


if __name__ == "__main__":
    main()
