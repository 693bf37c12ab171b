"""Test tooling around the TensorRT-LLM TEST DOUBLE: puts it on sys.path for one test only, and
builds engine folders from tests/fixtures/trtllm. Not part of the fake package itself."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

DOUBLE_DIR = Path(__file__).resolve().parent
FIXTURES = DOUBLE_DIR.parent / "fixtures" / "trtllm"


def _purge() -> None:
    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@contextlib.contextmanager
def double_on_path() -> Iterator[ModuleType]:
    """Yields the double's tensorrt_llm.bindings.executor module; afterwards the double is gone from
    sys.path and sys.modules and every Executor it built is shut down."""
    saved_path = list(sys.path)
    _purge()
    sys.path.insert(0, str(DOUBLE_DIR))
    try:
        import tensorrt_llm
        from tensorrt_llm.bindings import executor

        assert tensorrt_llm.IS_TEST_DOUBLE, f"imported {tensorrt_llm.__file__}, not the test double"
        executor.Executor.instances = []
        yield executor
    finally:
        if "tensorrt_llm.bindings.executor" in sys.modules:
            for ex in sys.modules["tensorrt_llm.bindings.executor"].Executor.instances:
                ex.shutdown()
        _purge()
        sys.path[:] = saved_path


def make_engine_dir(
    dest: Path,
    fixture: str,
    *,
    ranks: list[int] | None = None,
    version: str | None = None,
    engines_subdir: str | None = None,
) -> Path:
    """Copies fixtures/trtllm/<fixture> to dest and adds empty rank{r}.engine files (all ranks of the
    engine unless `ranks` says which) next to its engine config.json; returns dest."""
    shutil.copytree(FIXTURES / fixture, dest)
    config_path = dest / engines_subdir / "config.json" if engines_subdir else dest / "config.json"
    config = json.loads(config_path.read_text())
    if version is not None:
        config["version"] = version
        config_path.write_text(json.dumps(config))
    world = config.get("pretrained_config", {}).get("mapping", {}).get("world_size", 1)
    for r in range(world) if ranks is None else ranks:
        (config_path.parent / f"rank{r}.engine").write_bytes(b"")
    return dest


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Polls a condition the test cannot wait on directly (another process's or thread's state)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
