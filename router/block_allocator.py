"""Reference-counted allocator of the shard's KV-cache blocks (router-side bookkeeping only).

The shard owns `num_blocks` blocks of `block_size` tokens each; the router decides which request's
K/V goes where and sends the shard block tables (lists of block ids). A block is shared when
several holders reference it: the requests whose block tables contain it and, for prefix-cached
blocks, the radix cache itself (router/radix_cache.py). A block returns to the free list when its
last reference is dropped.

Eviction hook: a RadixCache registers its `evict` with `set_evictor` when it is built. When
`allocate` finds too few free blocks it first asks the evictor to free the shortfall, then retries
once; so the scheduler never calls `evict` itself. With the evictor comes `on_one_ref(block)`,
called when a block's count drops to exactly 1: for a cached block that is the cache's own
reference, so it may have just become evictable (the cache keeps its candidates incrementally
instead of scanning every cached block per allocation).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable


class OutOfBlocksError(Exception):
    """Fewer free blocks than asked for, even after eviction. Nothing was allocated."""

    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"requested {requested} KV blocks, only {free} free")
        self.requested = requested
        self.free = free


class BlockAllocator:
    """Invariant: block b is in the free list iff its refcount is 0."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks >= 0 and block_size > 0, (num_blocks, block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refcounts = [0] * num_blocks
        # FIFO: freed blocks go to the back, so a just-freed block is reused last.
        self._free: deque[int] = deque(range(num_blocks))
        self._evictor: Callable[[int], int] | None = None
        self._on_one_ref: Callable[[int], None] | None = None

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_blocks - len(self._free)

    def set_evictor(
        self, evictor: Callable[[int], int] | None, on_one_ref: Callable[[int], None] | None = None
    ) -> None:
        """`evictor(n)` tries to free n blocks (by dropping its own references) and returns how many
        it freed; `on_one_ref(b)` hears of every drop of block b's count to 1. At most one evictor;
        pass None to detach it."""
        assert evictor is None or self._evictor is None, "an evictor is already set"
        self._evictor = evictor
        self._on_one_ref = on_one_ref if evictor is not None else None

    def refcount(self, block: int) -> int:
        return self._refcounts[block]

    def blocks_for_tokens(self, n_tokens: int) -> int:
        """Blocks needed to hold n_tokens tokens (ceil division)."""
        assert n_tokens >= 0, n_tokens
        return -(-n_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, each with refcount 1. Raises OutOfBlocksError (allocating nothing) when
        fewer than n are free after asking the evictor for the shortfall; blocks the evictor freed
        stay free."""
        assert n >= 0, n
        if n > len(self._free) and self._evictor is not None:
            self._evictor(n - len(self._free))
        if n > len(self._free):
            raise OutOfBlocksError(requested=n, free=len(self._free))
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refcounts[b] = 1
        return blocks

    def incref(self, blocks: Iterable[int]) -> None:
        """Adds a reference to blocks that are already allocated (sharing a block)."""
        blocks = list(blocks)
        for b in blocks:
            assert 0 <= b < self.num_blocks and self._refcounts[b] > 0, f"incref of free block {b}"
        for b in blocks:
            self._refcounts[b] += 1

    def decref(self, blocks: Iterable[int]) -> None:
        """Drops one reference per occurrence; a block whose count reaches 0 is free again.
        Validates the whole call first, so a double free changes nothing before it asserts."""
        counts = Counter(blocks)
        for b, k in counts.items():
            assert 0 <= b < self.num_blocks and self._refcounts[b] >= k, f"double free of block {b}"
        hook = self._on_one_ref
        for b, k in counts.items():
            left = self._refcounts[b] = self._refcounts[b] - k
            if left == 0:
                self._free.append(b)
            elif left == 1 and hook is not None:
                hook(b)
