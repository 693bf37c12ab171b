"""router/batch_policy.py without a scheduler: admission against the KV cache and the batch cap,
the multi-step rule, and growth with preemption of the newest entry."""

from __future__ import annotations

import pytest

from router.batch_policy import NEARLY_FULL, admit, nobody_can_join, plan_growth
from router.handle import Entry, RequestHandle, State
from router.kv_planner import KvPlanner
from router.queue import WaitingQueue
from router.types import GenerateRequest, Limits, SamplingParams

BLOCK = 4
LIMITS = Limits(
    max_input_tokens=64, max_total_tokens=128, max_batch_prefill_tokens=256, max_batch_total_tokens=10_000,
    max_best_of=1, max_stop_sequences=4, max_top_n_tokens=5, max_client_batch_size=4, max_concurrent_requests=8,
)  # fmt: skip


def entry(i: int, prompt: int = 11, new: int = 8) -> Entry:
    req = GenerateRequest(input_ids=tuple(range(100 * i, 100 * i + prompt)), sampling=SamplingParams(),
                          max_new_tokens=new)  # fmt: skip
    return Entry(id=i, request=req, handle=RequestHandle(i, on_cancel=lambda: None))


def queue(*entries: Entry) -> WaitingQueue[Entry]:
    q: WaitingQueue[Entry] = WaitingQueue()
    for e in entries:
        q.push(e)
    return q


def test_admission_stops_at_a_head_the_kv_cache_cannot_place() -> None:
    kv = KvPlanner(num_blocks=5, block_size=BLOCK, prefix_caching=False)  # a prompt of 11 (+1) takes 3
    a, b = entry(1), entry(2)
    waiting = queue(a, b)
    first = admit(waiting, [], kv=kv, limits=LIMITS, max_batch_size=None)
    assert [e for e, _, _ in first.batch] == [a] and first.head_blocked_by_kv
    assert len(waiting) == 1 and kv.allocator.free_count == 2  # b stays queued, nothing allocated for it
    again = admit(waiting, [a], kv=kv, limits=LIMITS, max_batch_size=None)
    assert again.batch == [] and again.head_blocked_by_kv


def test_guaranteed_no_evict_reserves_every_running_entrys_full_length() -> None:
    # 11 + 8 tokens + the overshoot block: 23 -> 6 blocks for the whole life; prompt + 1 only 3.
    kv = KvPlanner(num_blocks=13, block_size=BLOCK, prefix_caching=False)
    assert kv.lifetime_blocks(entry(1)) == 6
    waiting = queue(entry(1), entry(2), entry(3))
    reserved = admit(waiting, [], kv=kv, limits=LIMITS, max_batch_size=None, reserve=True)
    assert [e.id for e, _, _ in reserved.batch] == [1, 2] and reserved.head_blocked_by_kv  # 6 + 6 + 6 > 13
    assert kv.allocator.free_count == 13 - 2 * 3  # only the prompts are allocated now
    running = [e for e, _, _ in reserved.batch]
    assert admit(waiting, running, kv=kv, limits=LIMITS, max_batch_size=None, reserve=True).batch == []
    # max_utilization places the third prompt in the same room (and would preempt later).
    optimistic = admit(waiting, running, kv=kv, limits=LIMITS, max_batch_size=None)
    assert [e.id for e, _, _ in optimistic.batch] == [3]


def test_the_batch_cap_is_not_a_kv_block() -> None:
    kv = KvPlanner(num_blocks=100, block_size=BLOCK, prefix_caching=False)
    result = admit(queue(entry(1), entry(2)), [], kv=kv, limits=LIMITS, max_batch_size=1)
    assert len(result.batch) == 1 and not result.head_blocked_by_kv


def test_engines_owning_their_kv_are_admitted_by_token_budget() -> None:
    limits = Limits(**{**LIMITS.__dict__, "max_batch_total_tokens": 40})  # one request of 11 + 8 fits twice
    result = admit(queue(entry(1), entry(2), entry(3)), [], kv=None, limits=limits, max_batch_size=None)
    assert [e.id for e, _, _ in result.batch] == [1, 2] and not result.head_blocked_by_kv


@pytest.mark.parametrize(
    ("waiting", "running", "cap", "blocked", "expected"),
    [
        (0, 5, 16, False, True),  # nobody waits
        (3, 5, 16, True, True),  # the head waits for KV room, not for a step boundary
        (3, 5, None, False, False),  # no cap: a waiting request can join now
        (3, 16 - 16 // NEARLY_FULL, 16, False, True),  # nearly full
        (3, 16 - 16 // NEARLY_FULL - 1, 16, False, False),
    ],
)
def test_multi_step_rule(waiting: int, running: int, cap: int | None, blocked: bool, expected: bool) -> None:
    assert nobody_can_join(waiting=waiting, running=running, max_batch_size=cap, head_blocked_by_kv=blocked) is expected


def test_growth_preempts_the_newest_entry_when_blocks_run_short() -> None:
    kv = KvPlanner(num_blocks=7, block_size=BLOCK, prefix_caching=False)
    running = []
    for i, e in enumerate([entry(1, prompt=7), entry(2, prompt=7)]):  # 2 blocks each (7 tokens + 1)
        placement = kv.place(e)
        assert placement is not None
        e.blocks, e.kv_len, e.state, e.admitted_at = placement.blocks, 7, State.RUNNING, i
        running.append(e)
    preempted: list[int] = []

    def preempt(e: Entry) -> None:
        preempted.append(e.id)
        e.state = State.WAITING
        kv.release(e, cache_it=False)
        running.remove(e)

    # 8 more tokens each: 7 + 8 + 1 = 16 tokens = 4 blocks each, 8 in all, 7 exist: the newest goes
    extensions = plan_growth(running, kv, 8, preempt)
    assert preempted == [2] and [i for i, _ in extensions] == [1] and len(extensions[0][1]) == 2
