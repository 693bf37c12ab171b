"""Checks a TensorRT-LLM engine folder before anything is loaded, and refuses clearly.

Every check raises EngineConfigError with the change to make. What is checked:
- config.json has the `version` key of trtllm-build 0.16+ (a legacy `builder_config` engine from
  TensorRT-LLM < 0.8 must be rebuilt) and that version is in the supported range;
- the installed tensorrt_llm is in the supported range and matches the engine's major.minor
  (TensorRT plans do not load across TensorRT versions);
- tp x pp in pretrained_config.mapping equals the MPI world (--num-shard);
- rank{r}.engine exists for every rank;
- the GPU's compute capability is high enough for the engine's dtype and quantization (FP8 needs
  8.9, NVFP4 10.0, bfloat16 8.0). The exact architecture an engine was compiled for is not
  recorded in config.json: TensorRT itself refuses a plan built for another GPU when it loads,
  and the adapter re-raises that refusal with advice (engine.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shard.engine.base import EngineConfigError
from shard.trtllm.limits import EngineLimits, read_limits

SUPPORTED_MIN = (0, 16)
SUPPORTED_MAX = (1, 2)  # later versions drop TensorRT engines for the PyTorch flow
SUPPORTED_RANGE = "0.16 to 1.2"

REBUILD_HINT = (
    "rebuild it with TensorRT-LLM {version}: `python examples/<model>/convert_checkpoint.py --model_dir <hf> "
    "--output_dir ckpt --dtype bfloat16 --tp_size N` then `trtllm-build --checkpoint_dir ckpt --output_dir "
    "<engine dir>` (or `optimum-cli export trtllm`); see docs/deploy.md"
)

# Minimum compute capability (major, minor) per quantization algorithm / dtype.
_QUANT_MIN_CC: dict[str, tuple[int, int]] = {
    "FP8": (8, 9),
    "FP8_PER_CHANNEL_PER_TOKEN": (8, 9),
    "FP8_BLOCK_SCALES": (8, 9),
    "W4A8_AWQ": (8, 9),
    "NVFP4": (10, 0),
    "W4A8_NVFP4_FP8": (10, 0),
}
_DTYPE_MIN_CC: dict[str, tuple[int, int]] = {"bfloat16": (8, 0)}


@dataclass(frozen=True)
class EngineConfig:
    """The facts of an engine's config.json the shard needs."""

    path: Path  # the config.json
    version: str  # TensorRT-LLM version that built the engine
    architecture: str
    dtype: str
    vocab_size: int
    world_size: int
    tp_size: int
    pp_size: int
    limits: EngineLimits
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    tokens_per_block: int | None
    gather_context_logits: bool

    @property
    def engine_dir(self) -> Path:
        return self.path.parent

    @property
    def min_compute_capability(self) -> tuple[int, int] | None:
        needs = [_QUANT_MIN_CC.get(self.quant_algo or ""), _QUANT_MIN_CC.get(self.kv_cache_quant_algo or "")]
        needs.append(_DTYPE_MIN_CC.get(self.dtype))
        known = [n for n in needs if n is not None]
        return max(known) if known else None


def version_tuple(version: str) -> tuple[int, int] | None:
    """(major, minor) of "1.2.0rc6.post2" -> (1, 2); None when unparseable."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def in_supported_range(version: str) -> bool:
    v = version_tuple(version)
    return v is not None and SUPPORTED_MIN <= v <= SUPPORTED_MAX


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise EngineConfigError(f"{path} does not exist") from e
    except (OSError, ValueError) as e:
        raise EngineConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise EngineConfigError(f"{path}: expected a JSON object")
    return data


def _section(data: Mapping[str, Any], key: str, where: Path) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise EngineConfigError(f"{where}: missing the {key!r} section of a trtllm-build engine config")
    return value


def parse_engine_config(path: Path) -> EngineConfig:
    """Reads an engine's config.json; refuses legacy and unversioned formats."""
    data = load_json(path)
    if "version" not in data:
        if "builder_config" in data:
            raise EngineConfigError(
                f"{path} is a legacy engine (`builder_config`, TensorRT-LLM < 0.8) that TensorRT-LLM "
                f"{SUPPORTED_RANGE} cannot load: " + REBUILD_HINT.format(version=SUPPORTED_RANGE)
            )
        raise EngineConfigError(
            f"{path} has no `version` key: not a trtllm-build 0.16+ engine config; "
            + REBUILD_HINT.format(version=SUPPORTED_RANGE)
        )
    version = str(data["version"])
    if not in_supported_range(version):
        raise EngineConfigError(
            f"{path}: the engine was built by TensorRT-LLM {version}, outside the supported {SUPPORTED_RANGE}; "
            + REBUILD_HINT.format(version=SUPPORTED_RANGE)
        )
    pretrained = _section(data, "pretrained_config", path)
    build = _section(data, "build_config", path)
    mapping = pretrained.get("mapping") or {}
    tp = int(mapping.get("tp_size", 1))
    pp = int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", tp * pp))
    if world != tp * pp * int(mapping.get("cp_size", 1)):
        raise EngineConfigError(
            f"{path}: pretrained_config.mapping has world_size {world} but tp_size {tp} x pp_size {pp}; "
            "the engine folder is inconsistent: rebuild it"
        )
    quant = pretrained.get("quantization") or {}
    plugins = build.get("plugin_config") or {}
    vocab = pretrained.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise EngineConfigError(
            f"{path}: pretrained_config.vocab_size must be a positive integer, got {vocab!r}"
        )
    return EngineConfig(
        path=path,
        version=version,
        architecture=str(pretrained.get("architecture", "")),
        dtype=str(pretrained.get("dtype", "")),
        vocab_size=vocab,
        world_size=world,
        tp_size=tp,
        pp_size=pp,
        limits=read_limits(build, pretrained, str(path)),
        quant_algo=quant.get("quant_algo"),
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
        tokens_per_block=plugins.get("tokens_per_block"),
        gather_context_logits=bool(build.get("gather_context_logits", False)),
    )


def check_installed_version(installed: str | None, engine: EngineConfig) -> None:
    """`installed` is tensorrt_llm.__version__, or None when the import failed."""
    if installed is None:
        raise EngineConfigError(
            "TensorRT-LLM is not installed (`import tensorrt_llm` failed): run the Dockerfile_trtllm image, "
            f"install tensorrt_llm {SUPPORTED_RANGE} from https://pypi.nvidia.com, or serve with --engine native"
        )
    if not in_supported_range(installed):
        raise EngineConfigError(
            f"the installed TensorRT-LLM {installed} is outside the supported {SUPPORTED_RANGE}: "
            "install a supported tensorrt_llm (the Dockerfile_trtllm image pins one) or serve with --engine native"
        )
    if version_tuple(installed) != version_tuple(engine.version):
        raise EngineConfigError(
            f"{engine.path}: the engine was built by TensorRT-LLM {engine.version} but {installed} is installed; "
            "TensorRT plans only load in the TensorRT version that built them: "
            + REBUILD_HINT.format(version=installed)
        )


def check_world(engine: EngineConfig, world_size: int) -> None:
    if engine.world_size != world_size:
        raise EngineConfigError(
            f"the engine was built for tp_size {engine.tp_size} x pp_size {engine.pp_size} = {engine.world_size} "
            f"rank(s), but the shard world has {world_size}: start it with --num-shard {engine.world_size} "
            f"(or rebuild the engine with --tp_size/--pp_size for {world_size} GPU(s))"
        )


def check_rank_engines(engine: EngineConfig) -> None:
    missing = [
        f"rank{r}.engine"
        for r in range(engine.world_size)
        if not (engine.engine_dir / f"rank{r}.engine").is_file()
    ]
    if missing:
        raise EngineConfigError(
            f"{engine.engine_dir}: missing {', '.join(missing)} (the engine has {engine.world_size} rank(s)); "
            "the build did not finish or the folder was copied partially: rebuild or copy every rank{r}.engine"
        )


def check_compute_capability(
    engine: EngineConfig, device_cc: tuple[int, int] | None, gpu_name: str | None
) -> None:
    """device_cc None (no GPU visible to torch, or torch absent) skips the check."""
    need = engine.min_compute_capability
    if device_cc is None or need is None or device_cc >= need:
        return
    what = engine.quant_algo or engine.kv_cache_quant_algo or engine.dtype
    raise EngineConfigError(
        f"the engine uses {what}, which needs compute capability {need[0]}.{need[1]}+, but this GPU "
        f"({gpu_name or 'unknown'}) is {device_cc[0]}.{device_cc[1]}: rebuild the engine without {what} "
        "(e.g. --dtype float16, no FP8 quantization) on this GPU, or use a newer GPU"
    )


def validate_engine(
    engine_dir: Path,
    *,
    installed_version: str | None,
    world_size: int,
    device_cc: tuple[int, int] | None,
    gpu_name: str | None,
) -> EngineConfig:
    """All checks, in the order a user can act on them; returns the parsed config."""
    engine = parse_engine_config(engine_dir / "config.json")
    check_installed_version(installed_version, engine)
    check_world(engine, world_size)
    check_rank_engines(engine)
    check_compute_capability(engine, device_cc, gpu_name)
    return engine
