"""The TGI stream's hand-formatted event equals the JSON encoder's output byte for byte."""

from __future__ import annotations

import json
import math

import pytest

from router.http_sse import tgi_event
from router.http_tgi import step_event, stream_json
from router.stream import OutToken, Step

TEXTS = ["", " Paris", 'say "hi"\\n', "tab\there\nnew", "日本語 🎉", "\u2028\u2029\x00\x1f", "é"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("logprob", [None, -0.0, -1.25, -1e-12, -123456.789, -math.pi])
@pytest.mark.parametrize("special", [False, True])
def test_fast_event_matches_the_encoder(text: str, logprob: float | None, special: bool) -> None:
    step = Step(7, OutToken(42, text, logprob, special), [])
    fast = step_event(step, details=True, prompt=None)
    assert fast == tgi_event(stream_json(step, details=True, prompt=None))
    body = json.loads(fast[len(b"data:") :])
    assert body["token"] == {"id": 42, "text": text, "logprob": logprob, "special": special}


def test_steps_with_top_tokens_take_the_encoder() -> None:
    step = Step(1, OutToken(1, "a", -0.5, False), [OutToken(2, "b", -1.0, False)])
    assert json.loads(step_event(step, details=False, prompt=None)[5:])["top_tokens"][0]["id"] == 2
