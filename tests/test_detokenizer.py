"""Incremental detokenization with the embedded model's real byte-level BPE tokenizer (emoji, CJK,
spaces, token sequences that split characters) and a SentencePiece-style decoder (leading spaces)."""

from __future__ import annotations

import random

import pytest
from router_double import real_tokenizer
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models

from router.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

TEXTS = [
    "Hello world",
    "  leading spaces,  double  spaces and a trailing one ",
    "Emoji 😀🎉 and a family 👨‍👩‍👧 with skin tone 👍🏽!",
    "你好，世界。日本語のテキストも。한국어도.",
    "mixed: naïve café — “quotes” … ∑∫√ 🇫🇷\n\nnew\tlines",
    "😀",
]


@pytest.fixture(scope="module")
def tok():
    return real_tokenizer()


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def random_byte_split_ids(tok, text: str, rng: random.Random) -> list[int]:
    """Token ids spelling `text` byte by byte in random chunks: chunks that are vocabulary
    tokens stay whole, others fall back to single-byte tokens. Multi-byte characters end up
    split across tokens at arbitrary byte positions."""
    vocab = tok.hf.get_vocab()
    enc = bytes_to_unicode()
    data = text.encode()
    ids, i = [], 0
    while i < len(data):
        n = rng.randint(1, 4)
        chunk = "".join(enc[b] for b in data[i : i + n])
        if chunk in vocab:
            ids.append(vocab[chunk])
        else:
            ids.extend(vocab[enc[b]] for b in data[i : i + n])
        i += n
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tok, text):
    prompt = tok.encode("Say something:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream(IncrementalDetokenizer(tok, prompt), ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


@pytest.mark.parametrize("seed", range(40))
def test_random_byte_splits_never_split_a_character(tok, seed):
    rng = random.Random(seed)
    text = rng.choice(TEXTS)
    ids = random_byte_split_ids(tok, text, rng)
    assert tok.decode(ids) == text  # the construction spells the text
    prompt = tok.encode(rng.choice(["", "Q: ", "你好"]), add_special_tokens=False)
    pieces = stream(IncrementalDetokenizer(tok, prompt), ids)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


def test_emoji_split_in_bytes_is_held_until_complete(tok):
    vocab = tok.hf.get_vocab()
    enc = bytes_to_unicode()
    ids = [vocab[enc[b]] for b in "😀".encode()]  # four single-byte tokens
    detok = IncrementalDetokenizer(tok, tok.encode("Hi", add_special_tokens=False))
    assert [detok.add(i) for i in ids] == ["", "", "", "😀"]
    assert detok.flush() == ""


def test_flush_emits_an_incomplete_character(tok):
    vocab = tok.hf.get_vocab()
    enc = bytes_to_unicode()
    first_two = [vocab[enc[b]] for b in "😀".encode()[:2]]
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add(i) for i in first_two] == ["", ""]
    tail = detok.flush()
    assert tail == tok.decode(first_two) and tail.endswith(REPLACEMENT_CHAR)
    assert detok.flush() == ""  # nothing is emitted twice


def test_special_tokens_add_no_text(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode("Hello there", add_special_tokens=False) + [eos]
    pieces = stream(IncrementalDetokenizer(tok, []), ids)
    assert pieces[-2:] == ["", ""]
    assert "".join(pieces) == "Hello there"


def test_prompt_ending_inside_a_character_is_not_used_as_context(tok):
    vocab = tok.hf.get_vocab()
    enc = bytes_to_unicode()
    partial = [vocab[enc[b]] for b in "😀".encode()[:3]]
    detok = IncrementalDetokenizer(tok, tok.encode("x", add_special_tokens=False) + partial)
    assert "".join(stream(detok, tok.encode(" ok", add_special_tokens=False))) == " ok"


def sentencepiece_like() -> RawTokenizer:
    words = ["<unk>", "▁Hello", "▁world", "▁again", ",", "▁", "▁多"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return raw


def test_sentencepiece_leading_space_is_kept():
    raw = sentencepiece_like()
    v = raw.get_vocab()
    assert raw.decode([v["▁world"]]) == "world"  # alone, the space is lost ...
    detok = IncrementalDetokenizer(raw, [v["▁Hello"]])
    pieces = stream(detok, [v["▁world"], v[","], v["▁again"], v["▁多"]])
    assert pieces[:4] == [" world", ",", " again", " 多"]  # ... in context, it is kept
    assert (
        "".join(pieces)
        == raw.decode([v["▁Hello"], v["▁world"], v[","], v["▁again"], v["▁多"]])[len("Hello") :]
    )
