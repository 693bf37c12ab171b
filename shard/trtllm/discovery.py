"""Finds the engine folder inside --model-id, and the generation_config.json that goes with it.

Two layouts exist:
- trtllm-build: `<dir>/config.json` + `rank{r}.engine` (what `trtllm-build --output_dir <dir>` writes);
- optimum-nvidia: `optimum-cli export trtllm ... --destination <dest>` nests the same files as
  `<dest>/<gpu name>/engines/` (one sub-folder per GPU model it was built on), with the Hugging Face
  files (generation_config.json, tokenizer) higher up.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shard.engine.base import EngineConfigError

log = logging.getLogger(__name__)

ENGINES_FOLDER = "engines"  # optimum-nvidia's name for the folder holding config.json + rank*.engine
_ENGINE_KEYS = ("pretrained_config", "build_config", "builder_config")


@dataclass(frozen=True)
class EngineLocation:
    engine_dir: Path  # holds config.json and rank{r}.engine
    layout: str  # "trtllm-build" | "optimum-nvidia"
    root: Path  # the --model-id folder
    gpu_folder: str | None = None  # optimum-nvidia: the <gpu name> level, as found on disk


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_engine_config(path: Path) -> bool:
    """True for a TensorRT-LLM engine config.json (any version), False for a Hugging Face one."""
    data = _read(path)
    return data is not None and any(key in data for key in _ENGINE_KEYS)


def normalize_gpu_name(name: str) -> str:
    """ "NVIDIA H100 80GB HBM3" and "NVIDIA_H100_80GB_HBM3" -> "nvidiah10080gbhbm3"."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_engine_dir(model_id: str, *, gpu_name: str | None = None) -> EngineLocation:
    """Locates the engine folder; raises EngineConfigError saying what was expected."""
    root = Path(model_id).expanduser()
    if not root.is_dir():
        raise EngineConfigError(
            f"--model-id {model_id}: no such folder; with --engine trtllm give a TensorRT-LLM engine folder "
            "(config.json + rank0.engine) or an optimum-nvidia export destination"
        )
    if is_engine_config(root / "config.json"):
        return EngineLocation(engine_dir=root, layout="trtllm-build", root=root)
    # optimum-nvidia keeps the model's Hugging Face config.json at <dest>, the engines below it.
    if is_engine_config(root / ENGINES_FOLDER / "config.json"):
        return EngineLocation(engine_dir=root / ENGINES_FOLDER, layout="optimum-nvidia", root=root)
    candidates = sorted(p.parent for p in root.glob(f"*/{ENGINES_FOLDER}/config.json") if is_engine_config(p))
    if not candidates and (root / "config.json").is_file():
        raise EngineConfigError(
            f"{root} holds a Hugging Face checkpoint, not a TensorRT-LLM engine: compile it first "
            "(trtllm-build or optimum-cli export trtllm; see docs/deploy.md) or serve it with --engine native"
        )
    if not candidates:
        raise EngineConfigError(
            f"no TensorRT-LLM engine under {root}: expected config.json + rank0.engine there, or optimum-nvidia's "
            f"<dest>/<gpu name>/{ENGINES_FOLDER}/; build one (docs/deploy.md) or serve with --engine native"
        )
    return _pick_gpu_folder(root, candidates, gpu_name)


def _pick_gpu_folder(root: Path, candidates: list[Path], gpu_name: str | None) -> EngineLocation:
    def location(engine_dir: Path) -> EngineLocation:
        return EngineLocation(
            engine_dir=engine_dir, layout="optimum-nvidia", root=root, gpu_folder=engine_dir.parent.name
        )

    wanted = normalize_gpu_name(gpu_name) if gpu_name else None
    matching = [c for c in candidates if wanted and normalize_gpu_name(c.parent.name) == wanted]
    if matching:
        return location(matching[0])
    if len(candidates) == 1:
        found = candidates[0].parent.name
        if wanted:
            # Same-architecture GPUs (H100 PCIe vs SXM) share engines; TensorRT refuses a wrong one at load.
            log.warning("engine folder %s was built on %r, this GPU is %r", candidates[0], found, gpu_name)
        return location(candidates[0])
    names = ", ".join(c.parent.name for c in candidates)
    raise EngineConfigError(
        f"{root} holds engines for several GPUs ({names}) and none is named after this one ({gpu_name or 'unknown'}): "
        "pass the right <dest>/<gpu name>/engines folder as --model-id"
    )


def find_model_file(location: EngineLocation, name: str, tokenizer_name: str = "") -> Path | None:
    """A Hugging Face file (generation_config.json, config.json) next to the engine, in a folder above
    it up to --model-id, or in the --tokenizer-name folder: trtllm-build does not copy them into the
    engine folder, optimum-nvidia keeps them at <dest>. An engine's own config.json never matches."""
    folders = [location.engine_dir, *location.engine_dir.parents]
    stop = folders.index(location.root) + 1 if location.root in folders else 1
    search = folders[:stop]
    if tokenizer_name and Path(tokenizer_name).expanduser().is_dir():
        search.append(Path(tokenizer_name).expanduser())
    for folder in search:
        path = folder / name
        if path.is_file() and not is_engine_config(path):
            return path
    return None
