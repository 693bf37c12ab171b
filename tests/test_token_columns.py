"""Decode-step tokens on the wire (proto TokenColumns): what the shard packs (shard/convert.py:
columns_to_pb) is what the router unpacks (router/client.py: token_rows), row for row, with and
without top tokens, through real protobuf bytes."""

from __future__ import annotations

import math

from router.client import token_rows
from router.pb import generate_pb2 as router_pb
from router.types import FinishReason as RouterFinish
from shard.convert import columns_to_pb
from shard.engine.types import FinishReason, Generation, TopTokens


def gen(rid: int, tok: int, *, finish: FinishReason | None = None, top: TopTokens | None = None) -> Generation:
    return Generation(
        request_id=rid, token_id=tok, logprob=-0.5 * tok, generated_tokens=tok + 1, seed=rid * 10,
        finish_reason=finish, top_tokens=top or TopTokens(),
    )  # fmt: skip


def over_the_wire(gens: list[Generation]) -> router_pb.TokenColumns:
    return router_pb.TokenColumns.FromString(columns_to_pb(gens).SerializeToString())


def test_plain_tokens_keep_order_ids_logprobs_and_finish_reasons() -> None:
    gens = [gen(3, 1), gen(1, 2, finish=FinishReason.EOS_TOKEN), gen(3, 3, finish=FinishReason.LENGTH)]
    cols = over_the_wire(gens)
    assert list(cols.generated_tokens) == [2, 3, 4] and list(cols.seeds) == [30, 10, 30]
    assert not cols.top_counts  # nobody asked: the columns stay empty
    got = [(rid, t.id, t.logprob, t.top_ids, t.finish_reason) for rid, t in token_rows(cols)]
    assert got == [
        (3, 1, -0.5, (), None),
        (1, 2, -1.0, (), RouterFinish.EOS_TOKEN),
        (3, 3, -1.5, (), RouterFinish.LENGTH),
    ]


def test_top_tokens_go_to_their_own_rows_when_only_some_rows_have_them() -> None:
    gens = [
        gen(1, 5, top=TopTokens(ids=(5, 9), logprobs=(-0.1, -2.0))),
        gen(2, 6),  # this request asked for none
        gen(1, 7, top=TopTokens(ids=(7, 8), logprobs=(-0.2, -math.inf)), finish=FinishReason.LENGTH),
    ]
    rows = token_rows(over_the_wire(gens))
    assert [rid for rid, _ in rows] == [1, 2, 1]
    assert [(t.top_ids, t.top_logprobs) for _, t in rows] == [
        ((5, 9), (-0.10000000149011612, -2.0)),  # float32 on the wire
        ((), ()),
        ((7, 8), (-0.20000000298023224, -math.inf)),
    ]
    assert rows[2][1].finish_reason is RouterFinish.LENGTH


def test_an_empty_answer_is_empty() -> None:
    assert token_rows(over_the_wire([])) == []
