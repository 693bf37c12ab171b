"""GGUF -> a cached Hugging Face style folder (config.json + model.safetensors, float32).

Opening and dequantizing the embedded 135M model takes seconds (the gguf reader parses the whole
vocabulary too), so the result is cached under cache_dir keyed by the file's absolute path, size and
mtime; later loads read the safetensors folder directly without opening the GGUF at all.

llama.cpp's converter permutes the rows of attn_q / attn_k of Llama-architecture models so that its
RoPE kernel can rotate adjacent pairs (GPT-J style); we undo it to get back transformers' rotate_half
layout, as transformers' own GGUF loader does. Qwen2 is converted without the permutation.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shard.engine.base import EngineConfigError
from shard.native.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/tgi-trtllm"
# Bumped whenever the conversion changes, so stale caches are not reused.
CONVERSION_VERSION = 1
PERMUTED_ARCHS = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise EngineConfigError(f"unexpected GGUF tensor {gguf_name!r}: not a Llama/Qwen2 weight")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: rows of each head go from interleaved pairs (x0 x1, x2 x3...)
    back to halves (x0 x2 ..., x1 x3 ...). w (n_heads * head_dim, ...) -> same shape."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All tensors dequantized to float32, in Hugging Face naming and layout."""
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # (rows, cols), torch order
        if config.model_type in PERMUTED_ARCHS:
            if ".q_proj." in name:
                w = unpermute_rotary(w, config.num_heads)
            elif ".k_proj." in name:
                w = unpermute_rotary(w, config.num_kv_heads)
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a writable copy
    return out


def cache_folder(gguf_path: Path, cache_dir: str | None) -> Path:
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    return root / f"gguf-{gguf_path.stem}-{digest}"


def convert_gguf(gguf_path: Path | str, *, cache_dir: str | None = None) -> Path:
    """Returns the cached folder for gguf_path, converting it first if needed.

    Safe against concurrent callers (every TP rank may call it): one converts under a file lock, the
    others wait and reuse. The folder appears by one rename, so it is either complete or absent.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise EngineConfigError(f"GGUF file {gguf_path} not found")
    final = cache_folder(gguf_path, cache_dir)
    if (final / "model.safetensors").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.parent / f"{final.name}.lock", "w")  # noqa: SIM115 -- held across the conversion
    except OSError as e:
        raise EngineConfigError(f"cannot write the GGUF cache in {final.parent}: {e}; set --cache-dir") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "model.safetensors").is_file():
            _convert_into(gguf_path, final)
    return final


def _convert_into(gguf_path: Path, final: Path) -> None:
    from gguf import GGUFReader
    from safetensors.torch import save_file

    started = time.monotonic()
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # the reader raises ValueError/struct.error/... on a corrupt file
        raise EngineConfigError(f"cannot read GGUF file {gguf_path}: {e}") from e
    config = ModelConfig.from_gguf(reader)
    state = gguf_state_dict(reader, config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": str(gguf_path)})
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        if final.exists():  # an incomplete folder not made by us (ours appear complete, by rename)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s into %s in %.1f s", gguf_path, final, time.monotonic() - started)
