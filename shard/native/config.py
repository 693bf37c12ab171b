"""The model configuration of the native engine: one frozen dataclass read from a Hugging Face
config.json (transformers 4.x or 5.x spelling) or from a GGUF file's metadata.

Supported: Llama (2, 3, 3.1+ with "llama3" RoPE scaling, SmolLM2), Mistral and Qwen2. Sliding-window
attention is not implemented: a model that declares a window gets max_position_embeddings clamped to
the window, inside which full causal attention is exactly what the window computes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shard.engine.base import EngineConfigError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants the model implements (see model.py rope_inv_freq); anything else is refused at load.
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# Defaults transformers uses when config.json omits the key.
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_RMS_EPS = {"llama": 1e-6, "mistral": 1e-6, "qwen2": 1e-6}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None = plain RoPE; else a dict with "rope_type" in SUPPORTED_ROPE_TYPES and that type's
    # parameters in transformers' spelling (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings). Never holds rope_theta (that is its own field).
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (qwen2 always; llama when config.attention_bias)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    o_proj_bias: bool = False  # llama's attention_bias also puts a bias on o_proj; qwen2 does not

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count (embedding and lm_head counted once each unless tied)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_proj_bias:
            attn += h
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + head + h

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise EngineConfigError(
                f"model_type {model_type!r} (architectures {d.get('architectures')}) is not supported by the "
                f"native engine; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise EngineConfigError(
                f"hidden_act {act!r} is not supported (the native engine implements SwiGLU/silu)"
            )
        if d.get("mlp_bias"):
            raise EngineConfigError("mlp_bias=true is not supported by the native engine")
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope_theta, rope_scaling = _rope_from_hf(d)
            max_pos = int(d.get("max_position_embeddings", 4096))
            max_pos = _clamp_to_sliding_window(d, max_pos)
            qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
            return cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(d.get("rms_norm_eps", _DEFAULT_RMS_EPS[model_type])),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=qkv_bias,
                o_proj_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(d.get("eos_token_id")),
            )
        except KeyError as e:
            raise EngineConfigError(f"config.json lacks required key {e.args[0]!r}") from e

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EngineConfigError(f"cannot read model config {path}: {e}") from e
        return cls.from_hf_dict(d)

    @classmethod
    def from_gguf(cls, reader: Any) -> ModelConfig:
        """Reads a gguf.GGUFReader's metadata (llama.cpp key names, `{arch}.` prefixed)."""
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            f = fields.get(key)
            return default if f is None else f.contents()

        arch = get("general.architecture")
        if arch not in SUPPORTED_MODEL_TYPES:
            raise EngineConfigError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        tensors = {t.name: t for t in reader.tensors}
        if "rope_freqs.weight" in tensors:
            # llama.cpp bakes Llama-3.1 RoPE scaling into per-frequency factors whose generating
            # parameters are not stored; guessing them would silently change the model.
            raise EngineConfigError(
                "this GGUF carries rope_freqs (Llama 3.1+ RoPE scaling), which the native engine cannot "
                "read from GGUF; serve the Hugging Face safetensors folder instead"
            )
        num_heads = int(get(f"{arch}.attention.head_count"))
        hidden = int(get(f"{arch}.embedding_length"))
        # token_embd is stored (hidden, vocab) in GGUF's reversed shape order.
        vocab = int(get(f"{arch}.vocab_size", tensors["token_embd.weight"].shape[-1]))
        rope_scaling = None
        scaling_type = get(f"{arch}.rope.scaling.type", "none")
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get(f"{arch}.rope.scaling.factor"))}
        elif scaling_type not in ("none", None):
            raise EngineConfigError(f"GGUF RoPE scaling type {scaling_type!r} is not supported")
        eos = get("tokenizer.ggml.eos_token_id")
        bos = get("tokenizer.ggml.bos_token_id")
        head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.rope.dimension_count")
        return cls(
            model_type=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(get(f"{arch}.feed_forward_length")),
            num_layers=int(get(f"{arch}.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=int(head_dim or hidden // num_heads),
            rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get(f"{arch}.rope.freq_base", _DEFAULT_ROPE_THETA)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get(f"{arch}.context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            o_proj_bias="blk.0.attn_output.bias" in tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=_as_id_tuple(eos),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-loadable config.json dict (4.x spelling, which 5.x also reads)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        d: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        if self.model_type == "mistral":
            d["sliding_window"] = None
        if self.model_type == "qwen2":
            d["use_sliding_window"] = False
        return d

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _as_id_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling:
    4.x: top-level rope_theta + rope_scaling {"rope_type"|"type": ..., factor...} (or null);
    5.x: rope_parameters {"rope_type": ..., "rope_theta": ..., factor...}."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or _DEFAULT_ROPE_THETA
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
    if float(partial) != 1.0:
        raise EngineConfigError(
            f"partial_rotary_factor={partial} is not supported (RoPE must cover head_dim)"
        )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise EngineConfigError(
            f"RoPE scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise EngineConfigError(f"llama3 rope scaling lacks {key!r}")
    if rope_type == "linear" and "factor" not in params:
        raise EngineConfigError("linear rope scaling lacks 'factor'")
    return float(theta), {"rope_type": rope_type, **params}


def _clamp_to_sliding_window(d: dict[str, Any], max_pos: int) -> int:
    window = d.get("sliding_window")
    if d.get("model_type") == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    if window is not None and int(window) < max_pos:
        log.warning(
            "model declares sliding_window=%s < max_position_embeddings=%s; the native engine has no "
            "sliding-window attention, so sequences are limited to %s tokens",
            window,
            max_pos,
            window,
        )
        return int(window)
    return max_pos
