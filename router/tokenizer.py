"""The model's Hugging Face tokenizer, as the router uses it: encode with TGI's truncation,
decode, special-token ids and chat templates.

load_tokenizer() accepts a Hugging Face folder, a hub name, or a .gguf file. Converting a GGUF
tokenizer with transformers takes ~7 s, so the converted tokenizer is saved once under the cache
directory (key: path + size + mtime of the .gguf) and loaded from there afterwards (~0.3 s).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_CACHE_ROOT = "~/.cache/tgi-trtllm"
# End-of-turn markers of common chat templates; when present as special tokens they stop a chat
# turn even if the model's EOS id is another token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class TokenizerError(Exception):
    """The tokenizer could not be loaded."""


class ChatTemplateMissing(Exception):
    """The tokenizer has no chat template."""


class Tokenizer:
    """A thin, typed wrapper over a transformers fast tokenizer. Thread-safe for encode/decode
    (the Rust tokenizer releases the GIL), which lets validation run in a thread pool."""

    def __init__(self, hf: PreTrainedTokenizerBase, *, name: str) -> None:
        self.hf = hf
        self.name = name
        # Encode and decode call the Rust tokenizer directly: transformers' wrapper adds ~15% to a
        # 100-token prompt's encode. Before each of its own calls transformers switches truncation
        # and padding off and sets encode_special_tokens from split_special_tokens; done once here,
        # so the ids are those of hf(text) (tests/test_tokenizer.py).
        self._fast = getattr(hf, "backend_tokenizer", None)
        if self._fast is not None:
            if self._fast.truncation is not None:
                self._fast.no_truncation()
            if self._fast.padding is not None:
                self._fast.no_padding()
            self._fast.encode_special_tokens = bool(getattr(hf, "split_special_tokens", False))
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, another ~12%; the ids
        # are the same.
        self._encode_batch = (
            None if self._fast is None else getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)
        )
        self.special_ids: frozenset[int] = frozenset(int(i) for i in hf.all_special_ids)
        eos = hf.eos_token_id
        self.eos_token_ids: tuple[int, ...] = () if eos is None else (int(eos),)
        vocab = hf.get_vocab()
        self.end_of_turn_ids: tuple[int, ...] = tuple(
            sorted({vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] in self.special_ids})
        )

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def encode(self, text: str, *, add_special_tokens: bool = True, truncate: int | None = None) -> list[int]:
        """Token ids of `text`. `truncate` keeps the LAST `truncate` tokens (TGI's semantics:
        the end of a prompt matters most to what comes next)."""
        return truncate_ids(self.encode_batch([text], add_special_tokens=add_special_tokens)[0], truncate)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, exactly as encode() gives them one by one. The Rust tokenizer
        splits the batch over its own threads, with the GIL released throughout."""
        if self._encode_batch is None:
            return [list(self.hf(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(
        self, text: str, *, add_special_tokens: bool = True
    ) -> list[tuple[int, int, int]]:
        """(id, start, stop) per token; start/stop are character offsets into `text`."""
        enc = self.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return [
            (int(i), int(s), int(e))
            for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens keep their text)."""
        return self.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render `messages` with the tokenizer's chat template. Templates that ignore `tools`
        simply do not see them. Raises ChatTemplateMissing, or the template's own error
        (jinja2.TemplateError for raise_exception(...)) for conversations it rejects."""
        if not self.has_chat_template:
            raise ChatTemplateMissing(f"the tokenizer of {self.name} has no chat template")
        text = self.hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert isinstance(text, str)
        return text


def truncate_ids(ids: list[int], truncate: int | None) -> list[int]:
    """The last `truncate` ids (all of them when None or when there are fewer)."""
    if truncate is not None and len(ids) > truncate:
        return ids[len(ids) - truncate :]
    return ids


def _cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def _load_gguf(path: Path, cache_root: Path) -> Any:
    """Convert the GGUF tokenizer once and keep the result under cache_root/tokenizers/<key>."""
    target = cache_root / "tokenizers" / _cache_key(path)
    if (target / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(target))
        except Exception as e:  # a damaged cache entry is rebuilt below
            logger.warning("cached tokenizer at %s is unreadable (%s); converting again", target, e)
    logger.info("converting the GGUF tokenizer of %s (one-off, cached under %s)", path, target)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write into a sibling temp dir, then rename: readers never see a half-written entry.
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        hf.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: its entry is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        logger.warning("could not cache the converted tokenizer under %s: %s", target, e)
    return hf


def load_tokenizer(name_or_path: str, cache_dir: str | None = None) -> Tokenizer:
    """Load a tokenizer from a Hugging Face folder or hub name, or from a .gguf file.

    cache_dir is the tgi-trtllm cache root ("" or None: ~/.cache/tgi-trtllm); converted GGUF
    tokenizers live under <cache_dir>/tokenizers/.
    """
    cache_root = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_ROOT))
    path = Path(os.path.expanduser(name_or_path))
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise TokenizerError(f"GGUF file not found: {path}")
            hf = _load_gguf(path, cache_root)
        else:
            hf = AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path)
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"cannot load a tokenizer from {name_or_path!r}: {e}") from e
    if not getattr(hf, "is_fast", False):
        raise TokenizerError(f"{name_or_path!r} has no fast (Rust) tokenizer; the router needs one")
    return Tokenizer(hf, name=name_or_path)
