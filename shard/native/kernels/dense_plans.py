"""When the dense prefill route may use cuDNN: ski rental over its per-shape graph builds.

torch's SDPA on H100 runs a fresh equal-length prefill (the dense route, triton_attention.
prefill_route) through cuDNN, which builds a graph on the first call of every new (sequences,
length) shape: 59-66 ms of host time each on an H100 (torch 2.11, cuDNN 9.19; the process's
first one ~0.9 s), the GPU idle behind it (bench/kernels_bench.py --sections first_call). Traffic
meets many shapes: every prompt length alone, every split of a burst of equal prompts. Once
built, cuDNN's kernel saves 15-45% of the paged Triton kernel's time, which compiles once for
every shape.

So a shape keeps the paged kernel until the time it lost there would have paid for its build,
then builds (ski rental: per shape, never more than twice the cost of the better of "always
build" and "never build" in hindsight). In a 32-layer model a shape seen once never builds;
8 x 2,048 tokens (a max-load prefill, ~13 ms saved per call) builds on its sixth call; 64 x 128
(~1.9 ms) on its 36th; one 1,024-token prompt (~0.5 ms) on its ~130th.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Measured on one H100 (bench/results/gpu-h100-20261127-session13/first-call/): the first call
# of a new shape, minus a second call, per attention call.
DEFAULT_BUILD_MS = 65.0
# What one layer's call saves with cuDNN's kernel against the paged one, fitted to the same
# run (per layer, steady state): T tokens of length L save ~T * (0.006 + 9.2e-6 * L) us. That
# gives 59 us at 64 x 128 (measured 52), 122 at 8 x 1,000 (117), 253 at 16 x 1,024 (262), 407 at
# 8 x 2,048 (409), 51 at 1 x 2,048 (34), 16 at 1 x 1,024 (7): over at small shapes, so they
# build sooner than the measurement alone would say.
_US_PER_TOKEN = 0.006
_US_PER_TOKEN_KEY = 9.2e-6
# Shapes still renting, kept at most; past it the ledger starts over (a shape then rents anew).
_MAX_RENTING = 4096


class DensePlans:
    """Which (sequences, length) shapes the dense route runs through cuDNN. Shared by every layer
    (one backend object): each layer's paged call of a shape books its loss (rent()); ready()
    turns True once a shape's losses reach the build's cost. build_ms 0 means every shape is
    ready at once (cuDNN from the first call, the behaviour before this ledger); the
    SHARD_CUDNN_BUILD_MS environment variable sets it when the constructor is not told."""

    def __init__(self, build_ms: float | None = None) -> None:
        if build_ms is None:
            raw = os.environ.get("SHARD_CUDNN_BUILD_MS", str(DEFAULT_BUILD_MS))
            try:
                build_ms = float(raw)
            except ValueError:
                raise ValueError(f"SHARD_CUDNN_BUILD_MS must be a number of milliseconds >= 0, got {raw!r}") from None
        if not build_ms >= 0:  # NaN fails too
            raise ValueError(f"build_ms (SHARD_CUDNN_BUILD_MS) must be >= 0, got {build_ms}")
        self.build_us = build_ms * 1e3
        self.built: set[tuple[int, int]] = set()
        self.lost_us: dict[tuple[int, int], float] = {}
        self._eager = False

    def ready(self, num_seqs: int, length: int) -> bool:
        if self._eager:
            self.built.add((num_seqs, length))
            return True
        return self.build_us == 0 or (num_seqs, length) in self.built

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Every shape met inside is built at once and stays built. For warmup: cuDNN's own start-up
        rides on the first builds of a process (0.85-0.96 s each for the first two on an H100,
        against ~65 ms later), so warmup builds a few shapes and no request pays that."""
        saved, self._eager = self._eager, True
        try:
            yield
        finally:
            self._eager = saved

    def rent(self, num_seqs: int, length: int) -> None:
        """One layer ran this shape on the paged kernel: book what cuDNN would have saved. The
        shape is ready from the next call on once the total reaches the build's cost."""
        key = (num_seqs, length)
        lost = self.lost_us.get(key, 0.0) + num_seqs * length * (_US_PER_TOKEN + _US_PER_TOKEN_KEY * length)
        if lost >= self.build_us:
            self.built.add(key)
            self.lost_us.pop(key, None)
            return
        if key not in self.lost_us and len(self.lost_us) >= _MAX_RENTING:
            self.lost_us.clear()
        self.lost_us[key] = lost
