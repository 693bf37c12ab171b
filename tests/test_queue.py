from dataclasses import dataclass

import pytest

from router.queue import WaitingQueue, min_new_batch_size, should_prefill


@dataclass
class Req:
    name: str


def test_waiting_queue_fifo_front_remove() -> None:
    q: WaitingQueue[Req] = WaitingQueue()
    assert len(q) == 0 and q.peek() is None and q.pop() is None
    a, b, c, p = Req("a"), Req("b"), Req("c"), Req("preempted")
    q.push(a)
    q.push(b)
    q.push(c)
    q.push_front(p)
    assert [r.name for r in q] == ["preempted", "a", "b", "c"]
    assert q.peek() is p and len(q) == 4
    assert q.remove(b) is True
    assert q.remove(b) is False
    assert q.remove(Req("c")) is False  # equal but not the queued object
    assert [r.name for r in q] == ["preempted", "a", "c"]
    assert q.pop() is p and q.pop() is a and q.pop() is c and q.pop() is None
    assert len(q) == 0


@pytest.mark.parametrize(
    ("waiting", "running", "steps", "ratio", "max_wait", "min_size", "expected"),
    [
        (0, 0, 0, 0.3, 20, None, False),  # nothing waiting
        (0, 5, 100, 0.3, 20, None, False),
        (1, 0, 0, 0.3, 20, None, True),  # empty batch: always start one
        (1, 3, 1, 0.3, 20, 0, True),  # floor(0.9) = 0: any newcomer joins a small batch
        (1, 4, 1, 0.3, 20, 1, True),  # floor(1.2) = 1
        (2, 10, 1, 0.3, 20, 3, False),  # floor(3.0) = 3 > 2 waiting: keep decoding
        (3, 10, 1, 0.3, 20, 3, True),
        (2, 10, 19, 0.3, 20, 3, False),  # just under max_waiting_tokens
        (2, 10, 20, 0.3, 20, None, True),  # waited long enough: any size
        (1, 100, 25, 0.3, 20, None, True),
        (5, 4, 1, 1.2, 20, 4, True),  # floor(4.8) = 4
        (3, 4, 1, 1.2, 20, 4, False),
        (1, 1, 1, 0.0, 20, 0, True),  # ratio 0: join whenever anything waits
    ],
)
def test_should_prefill(
    waiting: int, running: int, steps: int, ratio: float, max_wait: int, min_size: int | None, expected: bool
) -> None:
    kw = dict(steps_since_prefill=steps, waiting_served_ratio=ratio, max_waiting_tokens=max_wait)
    assert min_new_batch_size(running=running, **kw) == min_size
    assert should_prefill(waiting=waiting, running=running, **kw) is expected
