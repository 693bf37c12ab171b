"""Picks the engine implementation by name; implementations are imported only when chosen.

Besides the built-in names, `--engine package.module:callable` names any factory
`callable(config: ShardConfig, dist: DistContext) -> Engine` importable from the shard's sys.path.
That is how tests start real shard processes with a test double, and how an out-of-tree engine
plugs in without editing this file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from shard.config import ShardConfig
from shard.dist import DistContext
from shard.engine.base import Engine, EngineConfigError

EngineFactory = Callable[[ShardConfig, DistContext], Engine]


def _native(config: ShardConfig, dist: DistContext) -> Engine:
    from shard.native.engine import NativeEngine

    return NativeEngine.create(config, dist)


def _trtllm(config: ShardConfig, dist: DistContext) -> Engine:
    from shard.trtllm.engine import TrtllmEngine

    return TrtllmEngine.create(config, dist)


ENGINES: dict[str, EngineFactory] = {"native": _native, "trtllm": _trtllm}


def resolve_factory(name: str) -> EngineFactory:
    """The factory for a registered name or a "module:callable" reference."""
    if name in ENGINES:
        return ENGINES[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise EngineConfigError(
            f"unknown engine {name!r}; use one of {', '.join(ENGINES)} or a factory as 'package.module:callable'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EngineConfigError(f"engine factory {name!r}: cannot import {module_name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EngineConfigError(f"engine factory {name!r}: {module_name} has no callable {attr!r}")
    return factory


def create_engine(config: ShardConfig, dist: DistContext) -> Engine:
    """Builds (loads) the engine named by config.engine on this rank."""
    return resolve_factory(config.engine)(config, dist)
