"""Test helpers for the native model: a small ForwardBatch builder and a transformers twin.

The engine builds its batches itself (shard/native/engine.py); this builder exists so the model and
attention backends can be tested without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shard.native.config import ModelConfig
from shard.native.forward import ForwardBatch
from shard.native.loader import dummy_state_dict


@dataclass
class Seq:
    tokens: list[int]  # every token of the sequence after this step
    num_cached: int  # tokens whose K/V are already in the cache (prefix hit or earlier steps)
    blocks: list[int]  # block table, long enough for len(tokens)


def build_batch(
    seqs: list[Seq],
    *,
    block_size: int,
    is_prefill: bool,
    all_logits: bool = False,
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """Computes tokens[num_cached:] of every sequence. Logits for every new token when all_logits,
    else for the last new token of each sequence."""
    ids, pos, slots, cu, logits_idx = [], [], [], [0], []
    for s in seqs:
        assert len(s.blocks) * block_size >= len(s.tokens), "block table too short"
        for p in range(s.num_cached, len(s.tokens)):
            ids.append(s.tokens[p])
            pos.append(p)
            slots.append(s.blocks[p // block_size] * block_size + p % block_size)
        cu.append(len(ids))
        logits_idx.extend(range(cu[-2], cu[-1]) if all_logits else [cu[-1] - 1])
    max_blocks = max(len(s.blocks) for s in seqs)
    tables = [s.blocks + [0] * (max_blocks - len(s.blocks)) for s in seqs]
    seq_lens = [len(s.tokens) for s in seqs]

    def t(x: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device=device)

    return ForwardBatch(
        input_ids=t(ids, torch.int64),
        positions=t(pos, torch.int64),
        slot_mapping=t(slots, torch.int64),
        block_tables=t(tables, torch.int32),
        seq_lens=t(seq_lens, torch.int32),
        cu_seqlens_q=t(cu, torch.int32),
        logits_indices=t(logits_idx, torch.int64),
        is_prefill=is_prefill,
        max_seqlen_q=max(len(s.tokens) - s.num_cached for s in seqs),
        max_seqlen_k=max(seq_lens),
    )


def tiny_config(**overrides) -> ModelConfig:
    d = {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    d.update(overrides)
    return ModelConfig.from_hf_dict(d)


def perturbed_state_dict(config: ModelConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """dummy_state_dict made sharper for tests: weights x5 (std 0.1) so attention is far from uniform
    and a wrong mask or RoPE shows in the logits, and norm weights perturbed (all-ones hide norm bugs)."""
    sd = dummy_state_dict(config, seed=seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            sd[name] = t + 0.1 * torch.randn(t.shape, generator=gen)
        else:
            sd[name] = t * 5.0
    return sd


def save_hf_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], folder: Path):
    """Builds transformers' model of `config` with `state_dict`, saves it as safetensors, returns it."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()), missing
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), vocab) float32 logits of transformers' model on one sequence."""
    with torch.no_grad():
        return model(torch.tensor([tokens], device=model.device)).logits[0].float()


def leave_together() -> None:
    """The end of a spawned torch.distributed test worker whose results are saved: every rank
    meets at a barrier, then the process exits at once, without tearing the process group down.
    gloo's teardown aborted rank 0 twice on the CI VM ("terminate called without an active
    exception", SIGABRT) while its peer's process was exiting, even after a barrier; that teardown
    is not what these tests check. An error before this point still takes the worker's `finally`
    (destroy_process_group) and reaches mp.spawn as an exception."""
    import os
    import sys

    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
