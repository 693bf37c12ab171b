from collections.abc import Iterable, Sequence

import pytest

from router.block_allocator import BlockAllocator, OutOfBlocksError
from router.radix_cache import PrefixMatch, RadixCache

BS = 2  # tokens per block: small so sequences stay readable


class RecordingAllocator(BlockAllocator):
    """Records blocks in the order they return to the free list."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.freed: list[int] = []

    def decref(self, blocks: Iterable[int]) -> None:
        blocks = list(blocks)
        before = {b: self.refcount(b) for b in blocks}
        super().decref(blocks)
        self.freed += [b for b in before if self.refcount(b) == 0]


def make(num_blocks: int = 16) -> tuple[RecordingAllocator, RadixCache]:
    alloc = RecordingAllocator(num_blocks=num_blocks, block_size=BS)
    return alloc, RadixCache(alloc)


def run_and_cache(alloc: BlockAllocator, cache: RadixCache, tokens: Sequence[int]) -> list[int]:
    """A request without prefix reuse: allocate its blocks, cache them, release its own refs."""
    blocks = alloc.allocate(alloc.blocks_for_tokens(len(tokens)))
    cache.insert(tokens, blocks)
    alloc.decref(blocks)
    return blocks


def refs(alloc: BlockAllocator, blocks: Iterable[int]) -> list[int]:
    return [alloc.refcount(b) for b in blocks]


def test_miss() -> None:
    alloc, cache = make()
    assert cache.match([1, 2, 3, 4, 5]) == PrefixMatch(blocks=(), num_tokens=0)
    run_and_cache(alloc, cache, [1, 2, 3, 4])
    assert cache.match([9, 2, 3, 4, 5]) == PrefixMatch(blocks=(), num_tokens=0)
    assert cache.match([1]) == PrefixMatch(blocks=(), num_tokens=0)  # shorter than a block
    assert alloc.used_count == 2 and cache.cached_blocks == 2


def test_exact_hit_increfs_for_caller() -> None:
    alloc, cache = make()
    blocks = alloc.allocate(3)
    cache.insert([1, 2, 3, 4, 5, 6], blocks)
    assert cache.cached_blocks == 3
    assert refs(alloc, blocks) == [2, 2, 2]  # the request's and the cache's
    alloc.decref(blocks)
    assert refs(alloc, blocks) == [1, 1, 1]
    m = cache.match([1, 2, 3, 4, 5, 6])
    assert m == PrefixMatch(blocks=tuple(blocks), num_tokens=6)
    assert refs(alloc, blocks) == [2, 2, 2]
    alloc.decref(m.blocks)
    assert alloc.used_count == 3  # still cached


def test_partial_hit_only_full_blocks() -> None:
    alloc, cache = make()
    blocks = alloc.allocate(3)  # 5 tokens: the third block is partial
    cache.insert([1, 2, 3, 4, 5], blocks)
    assert cache.cached_blocks == 2
    assert refs(alloc, blocks) == [2, 2, 1]  # the partial block is not cached
    alloc.decref(blocks)
    assert alloc.refcount(blocks[2]) == 0
    assert cache.match([1, 2, 3, 4, 5, 6, 7]).blocks == tuple(blocks[:2])
    assert cache.match([1, 2, 3]).blocks == (blocks[0],)  # [3] is not a full chunk
    assert cache.match([1, 2, 3, 9, 5]).blocks == (blocks[0],)  # diverges in the second chunk
    assert cache.match([1, 2, 3, 9, 5]).num_tokens == BS


def test_two_sequences_share_a_prefix_branch() -> None:
    alloc, cache = make()
    a = run_and_cache(alloc, cache, [1, 2, 3, 4, 5, 6])
    # B reuses A's first two chunks and computes the third itself
    m = cache.match([1, 2, 3, 4, 7, 8][:-1])
    assert m.blocks == tuple(a[:2]) and m.num_tokens == 4
    b = [*m.blocks, *alloc.allocate(1)]
    cache.insert([1, 2, 3, 4, 7, 8], b)
    alloc.decref(b)
    assert cache.cached_blocks == 4
    assert refs(alloc, [*a, b[2]]) == [1, 1, 1, 1]
    assert cache.match([1, 2, 3, 4, 5, 6]).blocks == tuple(a)
    assert cache.match([1, 2, 3, 4, 7, 8]).blocks == (a[0], a[1], b[2])
    assert cache.match([1, 2, 3, 4, 9, 9]).blocks == tuple(a[:2])


def test_insert_duplicate_chunk_keeps_existing_block() -> None:
    alloc, cache = make()
    a = run_and_cache(alloc, cache, [1, 2, 3, 4])
    # C computed the same first two chunks into its own blocks (no match), plus a third
    c = alloc.allocate(3)
    cache.insert([1, 2, 3, 4, 5, 6], c)
    assert cache.cached_blocks == 3
    assert refs(alloc, c) == [1, 1, 2]  # c0, c1 not cached; c2 cached below a1
    assert cache.match([1, 2, 3, 4, 5, 6]).blocks == (a[0], a[1], c[2])
    alloc.decref(c)
    assert refs(alloc, c) == [0, 0, 2]  # c0, c1 freed; c2: cache + the match above
    # inserting the same sequence again changes nothing
    cache.insert([1, 2, 3, 4, 5, 6], [a[0], a[1], c[2]])
    assert cache.cached_blocks == 3 and refs(alloc, [*a, c[2]]) == [2, 2, 2]


def test_matched_blocks_are_not_evictable_while_held() -> None:
    alloc, cache = make()
    a = run_and_cache(alloc, cache, [1, 2, 3, 4, 5, 6])
    m = cache.match([1, 2, 3, 4, 5, 6])
    assert cache.evictable_blocks == 0
    assert cache.evict(10) == 0
    assert cache.cached_blocks == 3
    alloc.decref(m.blocks)
    m = cache.match([1, 2, 9])  # holds only the first block
    assert cache.evictable_blocks == 2
    assert cache.evict(10) == 2
    assert alloc.freed[-2:] == [a[2], a[1]]  # child before parent
    assert cache.cached_blocks == 1 and alloc.refcount(a[0]) == 2
    alloc.decref(m.blocks)
    assert cache.evict(10) == 1 and cache.cached_blocks == 0 and alloc.used_count == 0


def test_parent_held_only_by_cache_waits_for_held_child() -> None:
    alloc, cache = make()
    a = run_and_cache(alloc, cache, [1, 2])
    # D did not match (computed [1, 2] into d0) and caches d1 below a0 while still running
    d = alloc.allocate(2)
    cache.insert([1, 2, 3, 4], d)
    assert refs(alloc, [a[0], *d]) == [1, 1, 2]
    assert cache.evictable_blocks == 0  # a0 is the cache's alone but has a held child
    assert cache.evict(5) == 0
    alloc.decref(d)
    assert cache.evictable_blocks == 2
    assert cache.evict(5) == 2
    assert alloc.freed[-2:] == [d[1], a[0]]


def test_lru_eviction_order() -> None:
    alloc, cache = make()
    a = run_and_cache(alloc, cache, [1, 2, 3, 4])  # t1
    b = run_and_cache(alloc, cache, [5, 6, 7, 8])  # t2
    c_match = cache.match([1, 2, 9])  # t3: touches a0 only
    c = [*c_match.blocks, *alloc.allocate(1)]
    cache.insert([1, 2, 9, 9], c)  # t4: touches a0, caches c1
    alloc.decref(c)
    alloc.decref(cache.match([5, 6, 7, 8]).blocks)  # t5: touches b0, b1
    assert alloc.freed == []
    # leaves: a1 (t1), c1 (t4), b1 (t5); a0 (t4) once both its children are gone
    order = []
    for _ in range(5):
        assert cache.evict(1) == 1
        order += alloc.freed
        alloc.freed.clear()
    assert order == [a[1], c[1], a[0], b[1], b[0]]
    assert cache.evict(1) == 0 and cache.cached_blocks == 0


def test_lru_order_within_one_evict_call() -> None:
    alloc, cache = make()
    a = run_and_cache(alloc, cache, [1, 2, 3, 4, 5, 6])
    b = run_and_cache(alloc, cache, [7, 8])
    alloc.decref(cache.match([1, 2, 3, 4, 5, 6]).blocks)  # A is now the most recent
    assert cache.evict(3) == 3
    assert alloc.freed == [b[0], a[2], a[1]]  # a chain empties leaf-first


def test_evict_returns_freed_count() -> None:
    alloc, cache = make()
    run_and_cache(alloc, cache, [1, 2, 3, 4, 5, 6])
    run_and_cache(alloc, cache, [7, 8, 9, 10])
    assert cache.evictable_blocks == 5
    assert cache.evict(0) == 0
    assert cache.evict(2) == 2
    assert (cache.cached_blocks, alloc.used_count, alloc.free_count) == (3, 3, 13)
    assert cache.evict(10) == 3
    assert (cache.cached_blocks, alloc.used_count) == (0, 0)


def test_allocator_evicts_through_cache_when_short() -> None:
    alloc, cache = make(num_blocks=4)
    a = run_and_cache(alloc, cache, [1, 2, 3, 4])
    b = run_and_cache(alloc, cache, [5, 6, 7, 8])
    assert alloc.free_count == 0 and cache.cached_blocks == 4
    alloc.decref(cache.match([5, 6, 7, 8]).blocks)  # B recently used: A goes first
    assert sorted(alloc.allocate(2)) == sorted(a)
    assert cache.cached_blocks == 2
    held = cache.match([5, 6, 7, 8])
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(1)  # B is held: nothing evictable
    alloc.decref(held.blocks)
    assert alloc.allocate(1) == [b[1]]
    assert cache.cached_blocks == 1


def test_hit_rate_counters() -> None:
    alloc, cache = make()
    assert (cache.hits, cache.lookups, cache.hit_rate) == (0, 0, 0.0)
    cache.match([1, 2, 3])  # miss: 0 of 3
    run_and_cache(alloc, cache, [1, 2, 3, 4, 5])
    cache.match([1, 2, 3, 4, 5])  # 4 of 5
    cache.match([1, 2, 7, 7])  # 2 of 4
    assert (cache.hits, cache.lookups) == (6, 12)
    assert cache.hit_rate == 0.5


def test_insert_needs_a_block_per_full_chunk() -> None:
    alloc, cache = make()
    with pytest.raises(AssertionError):
        cache.insert([1, 2, 3, 4], alloc.allocate(1))


def test_incremental_candidates_evict_as_a_full_scan_would() -> None:
    """Random admissions, prefix hits, partial releases and evictions: every evict() frees the
    same blocks, in the same order, as the same cache with its candidate heap rebuilt from a scan
    of every cached block (the scan is the definition of LRU-over-evictable-leaves)."""
    import copy
    import random

    rng = random.Random(7)
    alloc, cache = make(num_blocks=64)
    held: list[list[int]] = []  # block tables of "running" requests
    for _ in range(600):
        op = rng.random()
        if op < 0.45:  # a request: match a prefix, allocate the rest, cache it, maybe keep holding it
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
            m = cache.match(tokens[:-1])
            try:
                fresh = alloc.allocate(alloc.blocks_for_tokens(len(tokens)) - len(m.blocks))
            except OutOfBlocksError:
                alloc.decref(m.blocks)
                continue
            blocks = [*m.blocks, *fresh]
            cache.insert(tokens, blocks)
            if rng.random() < 0.5:
                held.append(blocks)
            else:
                alloc.decref(blocks)
        elif op < 0.7 and held:
            alloc.decref(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randrange(1, 6)
            ref_alloc, ref_cache = copy.deepcopy((alloc, cache))
            ref_cache._compact()
            ref_alloc.freed.clear()
            alloc.freed.clear()
            assert cache.evict(n) == ref_cache.evict(n)
            assert alloc.freed == ref_alloc.freed
            assert cache.cached_blocks == ref_cache.cached_blocks


def test_failed_eviction_does_not_rescan_the_cache() -> None:
    """A full KV cache whose cached blocks are all held: each allocation that comes up short asks
    the cache to evict. That must not look at every cached block each time (it did: 2/3 of the
    router's CPU at max load with long sequences)."""
    alloc, cache = make(num_blocks=2000)
    tables = [alloc.allocate(4) for _ in range(500)]
    for i, t in enumerate(tables):
        cache.insert([i, i, i + 1, i + 1, i + 2, i + 2, i + 3, i + 3], t)  # cached and still held
    checks = 0
    real = cache._evictable

    def counting(node):  # type: ignore[no-untyped-def]
        nonlocal checks
        checks += 1
        return real(node)

    cache._evictable = counting  # type: ignore[method-assign]
    for _ in range(100):
        with pytest.raises(OutOfBlocksError):
            alloc.allocate(1)
    assert checks == 0  # nothing became evictable, so there was nothing to look at
    alloc.decref(tables[0])  # one sequence released: its 4 blocks are the cache's alone
    assert alloc.allocate(3) and checks < 20
