"""Prefix cache over full KV blocks (SGLang radix / TGI v3 style), router-side bookkeeping only.

A trie whose every edge is one block-sized chunk of token ids (a tuple of block_size ids); the node
below the edge names the KV block that holds those tokens' K/V. The path from the root spells a
block-aligned prefix, so a new prompt reuses the blocks along its longest cached path and the shard
computes only the rest. Partial blocks are never cached: a block is immutable once full, and only
full blocks are shared.

References: the cache holds one allocator reference on every block it caches; each request holds
its own on the blocks in its block table (match() takes them for the matched prefix). A cached
block is evictable when the cache's is its only reference. Eviction removes least recently used
leaves first, so a parent goes only after all its children; the allocator calls evict() itself
when it runs short (the cache registers it with BlockAllocator.set_evictor on construction).

Eviction candidates are kept incrementally, in a heap keyed (last_access, seq) with lazy deletion:
an entry is pushed whenever a node may have become evictable -- its block's count dropped to the
cache's one (the allocator's on_one_ref hook), it lost its last child, or insert() touched it while
evictable -- and checked when popped (still cached, still a leaf, count 1, key still current).
Invariant: every evictable node has an entry with its current key. Scanning all cached blocks per
allocation instead cost the router 2/3 of its CPU once the KV cache was full (router_bench, 384
sequences of 1,000 tokens over ~200 sequences' worth of blocks: 115 us per token vs 50 unpressed).

Why K/V in a block depends only on the path: K/V of token i is a function of tokens[: i + 1], so two
sequences with the same leading chunks produce the same K/V there, whichever physical block holds
it. That also makes it valid to cache a request's later blocks below a chunk another request cached
first (insert() keeps the existing node's block for that chunk).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from router.block_allocator import BlockAllocator

Chunk = tuple[int, ...]


@dataclass(frozen=True)
class PrefixMatch:
    blocks: tuple[int, ...]  # cached blocks covering the matched prefix, in order; caller holds a ref each
    num_tokens: int  # len(blocks) * block_size


@dataclass(eq=False)
class _Node:
    block: int
    parent: _Node | None  # None: a first chunk, child of the (block-less) root
    chunk: Chunk
    seq: int  # creation order: LRU tie-break, so eviction order is deterministic
    last_access: int = 0
    children: dict[Chunk, _Node] = field(default_factory=dict)


class RadixCache:
    def __init__(self, allocator: BlockAllocator) -> None:
        self._alloc = allocator
        self._bs = allocator.block_size
        self._seq = itertools.count()
        self._top: dict[Chunk, _Node] = {}  # the root's children: first chunks of sequences
        self._clock = 0  # logical time of the last match/insert (LRU), bumped once per call
        self._nodes: dict[int, _Node] = {}  # cached block id -> its node
        self._candidates: list[tuple[int, int, _Node]] = []  # heap; stale entries skipped on pop
        self.hits = 0  # prompt tokens served from the cache (sum of PrefixMatch.num_tokens)
        self.lookups = 0  # tokens looked up (sum of len(token_ids) passed to match)
        allocator.set_evictor(self.evict, on_one_ref=self._on_one_ref)

    @property
    def cached_blocks(self) -> int:
        return len(self._nodes)

    @property
    def hit_rate(self) -> float:
        """hits / lookups in tokens; 0.0 before the first lookup."""
        return self.hits / self.lookups if self.lookups else 0.0

    def _chunks(self, token_ids: Sequence[int]) -> Iterator[Chunk]:
        bs = self._bs
        for i in range(len(token_ids) // bs):
            yield tuple(token_ids[i * bs : (i + 1) * bs])

    def match(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest cached full-block prefix of token_ids. Takes a reference on each returned block
        for the caller (release with allocator.decref) and marks the path recently used.

        The shard must compute at least one prompt token, so a scheduler looking up a prompt passes
        `prompt[:-1]`: the match then stays strictly shorter than the prompt."""
        self._clock += 1
        children, blocks = self._top, []
        for chunk in self._chunks(token_ids):
            child = children.get(chunk)
            if child is None:
                break
            child.last_access = self._clock
            blocks.append(child.block)
            children = child.children
        self._alloc.incref(blocks)
        self.lookups += len(token_ids)
        self.hits += len(blocks) * self._bs
        return PrefixMatch(blocks=tuple(blocks), num_tokens=len(blocks) * self._bs)

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> None:
        """Caches the full blocks of a sequence: chunk i = token_ids[i*bs:(i+1)*bs] lives in
        blocks[i]. The cache takes its own reference on each block it newly caches; the caller keeps
        (and later drops) its own. For a chunk already cached the existing block is kept and the
        caller's block is simply not cached. Marks the path recently used."""
        n_full = len(token_ids) // self._bs
        assert len(blocks) >= n_full, f"{len(blocks)} blocks for {n_full} full chunks"
        self._clock += 1
        parent: _Node | None = None
        for chunk, block in zip(self._chunks(token_ids), blocks[:n_full], strict=True):
            children = self._top if parent is None else parent.children
            child = children.get(chunk)
            if child is None:
                assert block not in self._nodes, f"block {block} is already cached for other tokens"
                self._alloc.incref([block])
                child = _Node(block=block, parent=parent, chunk=chunk, seq=next(self._seq))
                children[chunk] = child
                self._nodes[block] = child
                child.last_access = self._clock
            else:
                child.last_access = self._clock
                self._push_if_evictable(child)  # its key changed: the old entry is stale now
            parent = child

    def _evictable(self, node: _Node) -> bool:
        return not node.children and self._alloc.refcount(node.block) == 1

    def _push_if_evictable(self, node: _Node) -> None:
        if self._evictable(node):
            heapq.heappush(self._candidates, (node.last_access, node.seq, node))

    def _on_one_ref(self, block: int) -> None:
        node = self._nodes.get(block)
        if node is not None:
            self._push_if_evictable(node)

    def _compact(self) -> None:
        """Rebuilds the heap from the evictable nodes once stale entries dominate (amortized O(1))."""
        self._candidates = [(n.last_access, n.seq, n) for n in self._nodes.values() if self._evictable(n)]
        heapq.heapify(self._candidates)

    def evict(self, n_blocks: int) -> int:
        """Frees up to n_blocks blocks: least recently used leaves whose only reference is the
        cache's, a parent becoming a candidate once its last child is gone. Returns how many."""
        if len(self._candidates) > 2 * len(self._nodes) + 64:
            self._compact()
        heap, freed = self._candidates, 0
        while heap and freed < n_blocks:
            last_access, _, node = heapq.heappop(heap)
            if self._nodes.get(node.block) is not node or node.last_access != last_access:
                continue  # evicted already, or touched since (a newer entry exists if evictable)
            if not self._evictable(node):
                continue  # held or has children: pushed again when that changes
            parent = node.parent
            del (self._top if parent is None else parent.children)[node.chunk]
            del self._nodes[node.block]
            self._alloc.decref([node.block])  # refcount 1 -> 0: back on the free list
            freed += 1
            if parent is not None:
                self._push_if_evictable(parent)
        return freed

    @property
    def evictable_blocks(self) -> int:
        """Blocks evict() could free now: cached blocks whose whole subtree is held by the cache
        alone. The scheduler adds this to allocator.free_count as the admission budget. O(cached)."""
        free_subtree: dict[int, bool] = {}  # id(node) -> subtree evictable
        count = 0
        # A node's seq is larger than its parent's (created later), so descending seq visits
        # children before parents.
        for node in sorted(self._nodes.values(), key=lambda n: n.seq, reverse=True):
            ok = self._alloc.refcount(node.block) == 1 and all(
                free_subtree[id(c)] for c in node.children.values()
            )
            free_subtree[id(node)] = ok
            count += ok
        return count
