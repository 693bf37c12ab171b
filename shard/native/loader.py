"""Builds a LlamaForCausalLM and fills it with this rank's shard of the weights.

Sources, all addressed by Hugging Face tensor names:
- a folder with config.json + *.safetensors (one file, or sharded with model.safetensors.index.json),
  read slice by slice (safe_open.get_slice) so a rank never materializes the full tensor;
- one .gguf file, dequantized once into a cached safetensors folder (gguf_loader.py);
- dummy weights from a config (load_format="dummy", a folder with only config.json, a config .json
  file, or a bundled config name such as "llama-3.1-8b"): exactly dummy_state_dict, sliced per rank.

The model is built on the meta device, sharded by tp.py, cut down to this pipeline stage's layers by
pipeline.py, then allocated and filled in place, so peak memory is this rank's shard plus one
source tensor; other stages' tensors are never read.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from shard.engine.base import EngineConfigError
from shard.native.attention import AttentionBackend
from shard.native.config import ModelConfig
from shard.native.model import LlamaForCausalLM
from shard.native.pipeline import PPStage, apply_pipeline_parallel
from shard.native.tp import (
    ShardSpec,
    TPGroup,
    apply_tensor_parallel,
    param_shard_spec,
    shard_range,
    shard_tensor,
)

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).parent / "configs"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DUMMY_STD = 0.02


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> float32 on CPU, bfloat16 elsewhere; else float32 / bfloat16 / float16 (and short forms)."""
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[name]
    except KeyError:
        raise EngineConfigError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


# ---------------------------------------------------------------------------------------------
# dummy weights


def hf_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face checkpoint of `config`, with its shape."""
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, out in (("q_proj", config.q_size), ("k_proj", config.kv_size), ("v_proj", config.kv_size)):
            shapes[f"{p}self_attn.{proj}.weight"] = (out, h)
            if config.attention_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, config.q_size)
        if config.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def dummy_tensor(
    name: str, shape: tuple[int, ...], *, seed: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Norm weights are ones; everything else N(0, 0.02) drawn in float32 from a generator seeded by
    (seed, name), so a tensor does not depend on which others are drawn, nor on the order. Values
    depend on the device type (CPU and CUDA generators differ) but not on dtype (cast after drawing)."""
    device = torch.device(device)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63))
    t = torch.randn(shape, generator=gen, dtype=torch.float32, device=device).mul_(DUMMY_STD)
    return t.to(dtype)


def dummy_state_dict(
    config: ModelConfig, *, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The full random checkpoint load_format="dummy" loads, in Hugging Face naming (loadable by
    transformers' LlamaForCausalLM / Qwen2ForCausalLM built from config.to_hf_dict())."""
    return {
        n: dummy_tensor(n, s, seed=seed, dtype=dtype, device=device)
        for n, s in hf_param_shapes(config).items()
    }


# ---------------------------------------------------------------------------------------------
# tensor sources


class TensorSource(Protocol):
    def get(self, name: str, spec: ShardSpec, tp: TPGroup) -> torch.Tensor:
        """This rank's shard of HF tensor `name` (any dtype and device; the loader converts)."""
        ...

    def names(self) -> set[str]: ...


class DummySource:
    def __init__(self, config: ModelConfig, *, seed: int, device: torch.device) -> None:
        self.shapes = hf_param_shapes(config)
        self.seed, self.device = seed, device

    def names(self) -> set[str]:
        return set(self.shapes)

    def get(self, name: str, spec: ShardSpec, tp: TPGroup) -> torch.Tensor:
        # The full tensor is drawn then sliced, so every TP size sees the same weights.
        full = dummy_tensor(name, self.shapes[name], seed=self.seed, dtype=torch.float32, device=self.device)
        return shard_tensor(full, spec, tp)


class SafetensorsSource:
    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(f, framework="pt") as h:
                    self.files.update({name: f for name in h.keys()})
        self._handles: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self.files)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._safe_open(path, framework="pt")
        return self._handles[path]

    def get(self, name: str, spec: ShardSpec, tp: TPGroup) -> torch.Tensor:
        sl = self._handle(self.files[name]).get_slice(name)
        shape = list(sl.get_shape())
        if spec.rank0_only and tp.rank != 0:
            return torch.zeros(shape)
        if spec.dim is None or tp.size == 1:
            return sl[:]
        start, stop, local = shard_range(shape[spec.dim], tp, spec.units)
        part = sl[start:stop] if spec.dim == 0 else sl[:, start:stop]
        if stop - start < local:  # uneven vocabulary: zero rows past the end
            shape[spec.dim] = local - (stop - start)
            part = torch.cat([part, part.new_zeros(shape)], dim=spec.dim)
        return part

    def close(self) -> None:
        self._handles.clear()


# ---------------------------------------------------------------------------------------------
# load_model


def load_model(
    model_id: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tp: TPGroup,
    pp: PPStage | None = None,
    load_format: str = "auto",
    cache_dir: str | None = None,
    attention: AttentionBackend | None = None,
    seed: int = 0,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Loads this rank's shard of `model_id` (see the module docstring for what model_id may be):
    pipeline stage `pp` (default: the whole model), tensor-parallel rank `tp` within it."""
    device = torch.device(device)
    fmt, path = resolve_model_source(model_id, load_format)
    if fmt == "gguf":
        from shard.native.gguf_loader import convert_gguf

        path, fmt = convert_gguf(path, cache_dir=cache_dir), "safetensors"
    config_path = path if path.is_file() else path / "config.json"
    config = ModelConfig.from_json_file(config_path)
    model = build_sharded_model(config, dtype=dtype, device=device, tp=tp, pp=pp, attention=attention)
    if fmt == "dummy":
        source: TensorSource = DummySource(config, seed=seed, device=device)
    else:
        source = SafetensorsSource(path)
    load_weights(model, source, tp)
    return model, config


def build_sharded_model(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tp: TPGroup,
    pp: PPStage | None = None,
    attention: AttentionBackend | None = None,
) -> LlamaForCausalLM:
    """An allocated but unfilled model holding this rank's shard shapes (this stage's layers only)."""
    pp = pp or PPStage.single()
    if tp.size == 1 and pp.size == 1:
        # Allocated in place, uninitialized (the model skips init); avoids the meta device, whose
        # first use imports ~1 s of torch internals.
        with torch.device(device):
            model = LlamaForCausalLM(config, attention=attention, dtype=dtype)
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(config, attention=attention, dtype=dtype)
        apply_tensor_parallel(model, tp)  # first: it shards the whole model's lm_head
        apply_pipeline_parallel(model, pp)
        model.to_empty(device=device)
    model.rotary_emb.reset_inv_freq(device)
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def load_weights(model: LlamaForCausalLM, source: TensorSource, tp: TPGroup) -> None:
    available = source.names()
    used: set[str] = set()
    for name, param in model.named_parameters():
        hf_names = model.hf_names(name)
        missing = [n for n in hf_names if n not in available]
        if missing:
            raise EngineConfigError(f"checkpoint lacks tensor(s) {missing} (needed for {name})")
        spec = param_shard_spec(name, model.config)
        parts = [source.get(n, spec, tp) for n in hf_names]
        used.update(hf_names)
        rows = sum(p.shape[0] for p in parts)
        if any(p.shape[1:] != param.shape[1:] for p in parts) or rows != param.shape[0]:
            got = [tuple(p.shape) for p in parts]
            raise EngineConfigError(
                f"checkpoint tensor(s) {hf_names} have shapes {got} (this rank's shard), but the config implies "
                f"{tuple(param.shape)} for {name}: config.json does not match the weights"
            )
        offset = 0
        for part in parts:  # fused parameters: each part into its own rows, no concatenated copy
            param[offset : offset + part.shape[0]].copy_(part)
            offset += part.shape[0]
    # Tensors of other pipeline stages are skipped by design: warn only about what no stage uses.
    whole = set(hf_param_shapes(model.config))
    unused = sorted(n for n in available - used - whole if not n.endswith("rotary_emb.inv_freq"))
    if unused and not (model.config.tie_word_embeddings and unused == ["lm_head.weight"]):
        log.warning("checkpoint tensors not used by the model: %s", unused[:8])


def _iter_weight_files(folder: Path) -> Iterator[Path]:
    for pattern in ("*.bin", "*.pt", "*.pth"):
        yield from folder.glob(pattern)


def resolve_model_source(model_id: str, load_format: str) -> tuple[str, Path]:
    """(format, path): ("safetensors", folder) | ("gguf", file) | ("dummy", folder or config json)."""
    if load_format not in LOAD_FORMATS:
        raise EngineConfigError(f"unknown load format {load_format!r}; use one of {', '.join(LOAD_FORMATS)}")
    path = Path(model_id).expanduser()
    if not path.exists() and (CONFIGS_DIR / f"{model_id}.json").is_file():
        path = CONFIGS_DIR / f"{model_id}.json"  # a bundled config name, e.g. "llama-3.1-8b"
    if not path.exists():
        raise EngineConfigError(
            f"model {model_id!r} not found: pass a folder with config.json and *.safetensors, a .gguf file, "
            f"a config .json (dummy weights) or a bundled config name "
            f"({', '.join(sorted(p.stem for p in CONFIGS_DIR.glob('*.json')))})"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            if load_format == "dummy":
                raise EngineConfigError("dummy weights need a config .json or folder, not a .gguf file")
            return "gguf", path
        if path.suffix == ".json" and load_format in ("auto", "dummy"):
            return "dummy", path
        raise EngineConfigError(
            f"{path}: expected a folder, a .gguf file or a config .json for load format {load_format}"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to serve a GGUF pass the file itself, e.g. {ggufs[0]}" if ggufs else ""
        raise EngineConfigError(f"{path} has no config.json{hint}")
    if load_format == "dummy":
        return "dummy", path
    if load_format == "gguf":
        raise EngineConfigError(f"load format gguf needs a .gguf file, got folder {path}")
    if any(path.glob("*.safetensors")):
        return "safetensors", path
    others = list(_iter_weight_files(path))
    if others:
        raise EngineConfigError(
            f"{path} holds {others[0].name} but no *.safetensors; the native engine reads safetensors only "
            "(convert with transformers' save_pretrained(safe_serialization=True))"
        )
    if load_format == "safetensors":
        raise EngineConfigError(f"{path} holds no *.safetensors files")
    log.warning("%s holds only config.json: using random (dummy) weights", path)
    return "dummy", path
