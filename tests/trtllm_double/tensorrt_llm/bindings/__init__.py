"""TEST DOUBLE of tensorrt_llm.bindings (only the `executor` submodule exists here)."""

from . import executor  # noqa: F401
