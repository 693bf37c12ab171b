"""router.batch_encoder: prompts asked for in one event-loop turn are encoded by one pool call;
the ids are those of encoding each prompt alone; errors and cancellation stay per request."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from router_double import real_tokenizer

from router import batch_encoder
from router.batch_encoder import BatchEncoder

PROMPTS = [f"Question {i}: what is {i} times {i + 1}? 😀" * (1 + i % 3) for i in range(40)]


class CountingPool(ThreadPoolExecutor):
    """A thread pool that records the size of each batch it is given."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.batches: list[int] = []

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN201 -- Executor's signature
        self.batches.append(len(args[1]))  # _encode_all(tokenizer, texts, add_special_tokens)
        return super().submit(fn, *args, **kwargs)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_one_pool_call_per_loop_turn_and_the_ids_of_encoding_each_alone():
    tok = real_tokenizer()
    pool = CountingPool()
    enc = BatchEncoder(pool)

    async def main() -> list[list[int]]:
        return list(
            await asyncio.gather(
                *(enc.encode(tok, p, truncate=[None, 5, 1000][i % 3]) for i, p in enumerate(PROMPTS))
            )
        )

    got = run(main())
    assert got == [tok.encode(p, truncate=[None, 5, 1000][i % 3]) for i, p in enumerate(PROMPTS)]
    assert pool.batches == [len(PROMPTS)]
    pool.shutdown()


def test_requests_in_different_turns_do_not_wait_for_each_other():
    tok = real_tokenizer()
    pool = CountingPool()
    enc = BatchEncoder(pool)

    async def main() -> list[list[int]]:
        return [await enc.encode(tok, p) for p in PROMPTS[:3]]

    assert run(main()) == [tok.encode(p) for p in PROMPTS[:3]]
    assert pool.batches == [1, 1, 1]
    pool.shutdown()


def test_add_special_tokens_groups_and_large_bursts_are_split(monkeypatch):
    monkeypatch.setattr(batch_encoder, "MAX_BATCH", 16)
    tok = real_tokenizer()
    pool = CountingPool()
    enc = BatchEncoder(pool)
    flags = [i % 4 != 0 for i in range(len(PROMPTS))]  # 30 with special tokens, 10 without

    async def main() -> list[list[int]]:
        return list(
            await asyncio.gather(
                *(enc.encode(tok, p, add_special_tokens=f) for p, f in zip(PROMPTS, flags, strict=True))
            )
        )

    assert run(main()) == [tok.encode(p, add_special_tokens=f) for p, f in zip(PROMPTS, flags, strict=True)]
    assert sorted(pool.batches) == [10, 14, 16]
    pool.shutdown()


class FlakyTokenizer:
    """Fails a batch that holds a text with "boom" in it, as a Rust error would."""

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        if any("boom" in t for t in texts):
            raise ValueError("cannot encode boom")
        return [[len(t), int(add_special_tokens)] for t in texts]


def test_a_text_that_cannot_be_encoded_fails_its_own_request_only():
    pool = CountingPool()
    enc = BatchEncoder(pool)
    tok = FlakyTokenizer()

    async def main() -> list[object]:
        texts = ["a", "boom", "ccc"]
        return list(await asyncio.gather(*(enc.encode(tok, t) for t in texts), return_exceptions=True))  # type: ignore[arg-type]

    a, boom, c = run(main())
    assert a == [1, 1] and c == [3, 1]
    assert isinstance(boom, ValueError) and "boom" in str(boom)
    pool.shutdown()


def test_a_cancelled_caller_does_not_disturb_the_others():
    tok = real_tokenizer()
    pool = CountingPool()
    enc = BatchEncoder(pool)

    async def main() -> list[list[int]]:
        tasks = [asyncio.ensure_future(enc.encode(tok, p)) for p in PROMPTS[:5]]
        await asyncio.sleep(0)  # all five have asked
        tasks[2].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[2], asyncio.CancelledError)
        return [d for i, d in enumerate(done) if i != 2]

    assert run(main()) == [tok.encode(p) for i, p in enumerate(PROMPTS[:5]) if i != 2]
    pool.shutdown()


def test_a_shut_down_pool_fails_the_request_instead_of_hanging():
    pool = CountingPool()
    pool.shutdown()
    enc = BatchEncoder(pool)
    with pytest.raises(RuntimeError, match="shutdown"):
        run(enc.encode(FlakyTokenizer(), "a"))  # type: ignore[arg-type]
