import pytest

from router.block_allocator import BlockAllocator, OutOfBlocksError


def test_allocate_counts_and_fifo_reuse() -> None:
    a = BlockAllocator(num_blocks=4, block_size=16)
    assert (a.num_blocks, a.block_size, a.free_count, a.used_count) == (4, 16, 4, 0)
    assert a.allocate(0) == []
    assert a.allocate(3) == [0, 1, 2]
    assert (a.free_count, a.used_count) == (1, 3)
    a.decref([1])
    assert (a.free_count, a.used_count, a.refcount(1)) == (2, 2, 0)
    # freed blocks go to the back of the free list
    assert a.allocate(2) == [3, 1]
    assert a.free_count == 0


def test_refcounts_shared_block_freed_by_last_holder() -> None:
    a = BlockAllocator(num_blocks=3, block_size=4)
    b = a.allocate(2)
    a.incref(b)
    a.incref([b[0]])
    assert [a.refcount(x) for x in b] == [3, 2]
    a.decref(b)
    assert [a.refcount(x) for x in b] == [2, 1]
    assert a.free_count == 1
    a.decref(b)
    assert [a.refcount(x) for x in b] == [1, 0]
    assert a.free_count == 2
    a.decref([b[0]])
    assert a.free_count == 3 and a.used_count == 0


def test_duplicate_ids_in_one_decref() -> None:
    a = BlockAllocator(num_blocks=2, block_size=4)
    [x] = a.allocate(1)
    a.incref([x])
    a.decref([x, x])
    assert a.refcount(x) == 0 and a.free_count == 2


def test_out_of_blocks_leaves_state_unchanged() -> None:
    a = BlockAllocator(num_blocks=3, block_size=4)
    held = a.allocate(2)
    with pytest.raises(OutOfBlocksError) as e:
        a.allocate(2)
    assert (e.value.requested, e.value.free) == (2, 1)
    assert (a.free_count, a.used_count) == (1, 2)
    assert [a.refcount(x) for x in held] == [1, 1]
    assert a.allocate(1) == [2]


def test_double_free_detected_and_nothing_changed() -> None:
    a = BlockAllocator(num_blocks=3, block_size=4)
    x, y = a.allocate(2)
    a.decref([x])
    with pytest.raises(AssertionError, match="double free"):
        a.decref([x])
    # a failing call applies none of its decrements
    with pytest.raises(AssertionError, match="double free"):
        a.decref([y, y])
    assert a.refcount(y) == 1 and a.free_count == 2
    with pytest.raises(AssertionError, match="incref of free block"):
        a.incref([x])
    with pytest.raises(AssertionError):
        a.decref([7])


@pytest.mark.parametrize(
    ("block_size", "n_tokens", "blocks"),
    [(16, 0, 0), (16, 1, 1), (16, 16, 1), (16, 17, 2), (16, 32, 2), (1, 5, 5), (4, 9, 3)],
)
def test_blocks_for_tokens(block_size: int, n_tokens: int, blocks: int) -> None:
    assert BlockAllocator(num_blocks=1, block_size=block_size).blocks_for_tokens(n_tokens) == blocks


def test_evictor_called_for_shortfall_only() -> None:
    a = BlockAllocator(num_blocks=4, block_size=4)
    cached = a.allocate(3)  # stand-in for blocks only a cache holds
    calls: list[int] = []

    def evictor(n: int) -> int:
        calls.append(n)
        freed = cached[:n]
        a.decref(freed)
        del cached[:n]
        return len(freed)

    a.set_evictor(evictor)
    assert a.allocate(1) == [3]
    assert calls == []  # enough free blocks: no eviction
    assert a.allocate(2) == [0, 1]
    assert calls == [2]
    with pytest.raises(OutOfBlocksError):
        a.allocate(2)  # evictor frees 1 of the 2 missing: still short
    assert calls == [2, 2]
    assert a.free_count == 1  # what the evictor freed stays free; nothing allocated
    with pytest.raises(AssertionError):
        a.set_evictor(evictor)  # only one evictor
    a.set_evictor(None)
    a.set_evictor(evictor)
