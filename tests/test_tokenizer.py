"""router.tokenizer: GGUF conversion cached on disk, encode/truncate/decode, special ids, chat template."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from router_double import gguf_path, real_tokenizer, tokenizer_cache_root

from router.tokenizer import ChatTemplateMissing, Tokenizer, TokenizerError, _cache_key, load_tokenizer


def test_gguf_conversion_is_cached_and_reloaded_fast():
    tok = real_tokenizer()
    entries = list((Path(tokenizer_cache_root()) / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    assert not [p for p in entries[0].parent.iterdir() if p.name.startswith(".tmp-")]  # no leftovers
    start = time.monotonic()
    again = load_tokenizer(gguf_path(), tokenizer_cache_root())
    assert time.monotonic() - start < 5  # the conversion itself takes ~7 s or more
    text = "Hello 😀 你好 <|im_end|>"
    assert again.encode(text) == tok.encode(text)
    folder = load_tokenizer(str(entries[0]))  # the cache entry is a plain Hugging Face folder
    assert folder.encode(text) == tok.encode(text)


def test_cache_key_follows_path_size_and_mtime(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    k1 = _cache_key(f)
    os.utime(f, ns=(1, 1))
    k2 = _cache_key(f)
    f.write_bytes(b"abcd")
    k3 = _cache_key(f)
    assert len({k1, k2, k3}) == 3


def test_special_ids_and_eos():
    tok = real_tokenizer()
    assert tok.eos_token_ids == (2,)  # <|im_end|>
    assert tok.is_special(2) and not tok.is_special(tok.encode("a", add_special_tokens=False)[0])
    assert 2 in tok.end_of_turn_ids
    assert tok.vocab_size == 49152


def test_truncate_keeps_the_last_tokens():
    tok = real_tokenizer()
    ids = tok.encode("one two three four five")
    assert tok.encode("one two three four five", truncate=2) == ids[-2:]
    assert tok.encode("one", truncate=10) == tok.encode("one")


def test_chat_template_and_decode():
    tok = real_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert "<|im_start|>" not in tok.decode(ids, skip_special_tokens=True)


def test_missing_chat_template_and_missing_file(tmp_path):
    tok = real_tokenizer()
    saved = tok.hf.chat_template
    try:
        tok.hf.chat_template = None
        with pytest.raises(ChatTemplateMissing):
            tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    finally:
        tok.hf.chat_template = saved
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "absent.gguf"), str(tmp_path))


# Texts where a tokenizer's special cases show: special-token text, byte fallback, whitespace runs.
TRICKY = [
    "",
    " ",
    "Hello, world!",
    "  leading and   inner   spaces\t\ttabs\n\nnewlines ",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "not special: <|im_end or <|im_end|x",
    "😀 你好 café naïve Ωmega \u2028 \x00 \ufeff",
    "1234567890 3.14159 -0.0 1e10",
    "word " * 300,
]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_and_encode_batch_give_the_ids_of_the_hugging_face_call(add_special_tokens):
    """The router encodes through the Rust tokenizer directly, in batches; the ids must be those
    of transformers' own call, one text at a time."""
    tok = real_tokenizer()
    expected = [list(tok.hf(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in TRICKY]
    assert tok.encode_batch(TRICKY, add_special_tokens=add_special_tokens) == expected
    assert [tok.encode(t, add_special_tokens=add_special_tokens) for t in TRICKY] == expected
    assert tok.encode_batch([], add_special_tokens=add_special_tokens) == []


def test_direct_encoding_ignores_truncation_and_padding_saved_in_the_tokenizer():
    """A tokenizer.json may carry truncation or padding; transformers switches both off for a call
    without them, and so does the router's direct path."""
    folder = Path(tokenizer_cache_root()) / "tokenizers"
    source = next(folder.iterdir())
    loaded = load_tokenizer(str(source))
    loaded.hf.backend_tokenizer.enable_truncation(max_length=3)
    loaded.hf.backend_tokenizer.enable_padding(length=64)
    again = Tokenizer(loaded.hf, name="with truncation and padding")
    text = "one two three four five six seven"
    assert again.encode(text) == real_tokenizer().encode(text)
    assert len(again.encode(text)) > 3
