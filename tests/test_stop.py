"""Stop strings across token boundaries: hold-back, release, first match wins, never leaked."""

from __future__ import annotations

import random

import pytest
from router_double import real_tokenizer

from router.stop import StopMatcher
from router.stream import TextAssembler


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    """Released text per piece (+ the final flush) and the matched stop string."""
    m = StopMatcher(stops)
    out, matched = [], None
    for p in pieces:
        r = m.push(p)
        out.append(r.text)
        if r.matched is not None:
            matched = r.matched
            break
    out.append(m.flush())
    return out, matched


def test_stop_across_token_boundaries():
    out, matched = run(["lo wo"], ["Hel", "lo", " w", "orld"])
    assert matched == "lo wo"
    assert "".join(out) == "Hel"
    assert out == ["He", "l", "", "", ""]  # "l" may start "lo wo": held, then released


def test_partial_match_is_held_then_released_when_it_fails():
    out, matched = run(["abc"], ["xa", "b", "d", "e"])
    assert matched is None
    assert out == ["x", "", "abd", "e", ""]


def test_held_text_released_by_flush_at_the_end():
    out, matched = run(["END"], ["the E", "N"])
    assert matched is None
    assert out == ["the ", "", "EN"]


def test_first_occurrence_wins_among_several_stops():
    out, matched = run(["world", "lo"], ["hello world"])
    assert matched == "lo" and "".join(out) == "hel"
    out, matched = run(["lo", "hello"], ["hel", "lo"])
    assert matched == "hello" and "".join(out) == ""


def test_stop_at_the_very_start():
    out, matched = run(["The"], ["Th", "e end"])
    assert matched == "The"
    assert out == ["", "", ""]


def test_stop_inside_one_piece_and_nothing_after_a_match():
    m = StopMatcher(["\n\n"])
    assert m.push("a\n\nb").text == "a"
    assert m.push("more").text == ""
    assert m.flush() == ""


def test_overlapping_prefixes_hold_the_longest_candidate():
    # "aab" could still start at either 'a': the whole "aa" suffix is held.
    out, matched = run(["aab"], ["xaa", "a", "b"])
    assert matched == "aab"
    assert "".join(out) == "xa"


def test_empty_stop_strings_are_ignored():
    out, matched = run(["", "zz"], ["abc"])
    assert matched is None and "".join(out) == "abc"


def test_no_stops_is_a_pass_through():
    m = StopMatcher([])
    assert m.push("anything").text == "anything" and m.flush() == ""


ALPHABET = "ab c😀\n你"


@pytest.mark.parametrize("seed", range(300))
def test_random_splits_never_leak_and_cut_at_the_first_match(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30)))
    stops = [
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
    ]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out, matched = run(stops, pieces)
    hits = [(text.find(s), s) for s in stops if s in text]
    released = "".join(out)
    if hits:
        first = min(i for i, _ in hits)
        assert matched is not None and text.find(matched) == first
        assert released == text[:first]
    else:
        assert matched is None and released == text
    # Never leaked: no prefix of what was released ever contained a stop string.
    so_far = ""
    for piece in out:
        so_far += piece
        assert not any(s in so_far for s in stops)


def test_text_assembler_stops_across_real_tokens():
    tok = real_tokenizer()
    ids = tok.encode("The answer is 42. 😀 Then more text.", add_special_tokens=False)
    asm = TextAssembler(tok, tok.encode("Q:", add_special_tokens=False), ["2. 😀"])
    released = []
    for i in ids:
        released.append(asm.push(i))
        if asm.matched is not None:
            break
    assert asm.matched == "2. 😀"
    assert "".join(released) + asm.finish() == "The answer is 4"


def test_text_assembler_flushes_held_text_at_the_end():
    tok = real_tokenizer()
    ids = tok.encode("ends with STO", add_special_tokens=False)
    asm = TextAssembler(tok, [], ["STOP"])
    released = "".join(asm.push(i) for i in ids)
    assert released == "ends with "
    assert asm.finish() == "STO" and asm.matched is None
