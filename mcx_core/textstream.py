"""Reading a user's text file incrementally: chunks of checked UTF-8, and the first N tokens of it without
holding the whole file (a 57 MB text for 544 tokens reads a few chunks, not 57 MB into a tokenizer).

Token boundaries at chunk edges: a chunk's tokens near its end may change once more text follows (a word
cut in half, a run of spaces), so only the tokens that end at least `margin` characters before the end of
the text read so far are kept; the rest of the text is carried into the next round and tokenized again.
Tokens are therefore the same as tokenizing the whole text (tested), while memory stays ~constant."""

from __future__ import annotations

import codecs
from array import array
from collections.abc import Iterator
from pathlib import Path

CHUNK_BYTES = 1 << 18
MARGIN_CHARS = 512


class TextError(ValueError):
    """A text file that cannot be used (missing, empty, binary, not UTF-8, too short)."""


def check_text_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise TextError(f"{path} is a directory; give a UTF-8 text file")
    if not path.is_file():
        raise TextError(f"no such file: {path}")
    return path


def iter_text_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The file's text, decoded as UTF-8 chunk by chunk (a character split across chunks is kept whole).
    TextError for an empty, binary (NUL bytes in the first 8 KiB) or non-UTF-8 file, at the byte it fails."""
    path = check_text_file(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    seen_text = False
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(chunk_bytes)
                if offset == 0 and b"\x00" in raw[:8192]:
                    raise TextError(f"{path} looks binary (NUL bytes); give a UTF-8 text file")
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as err:
                    raise TextError(
                        f"{path} is not UTF-8 text ({err.reason} at byte {offset + err.start})"
                    ) from None
                offset += len(raw)
                if text:
                    seen_text = seen_text or bool(text.strip())
                    yield text
                if not raw:
                    break
    except OSError as err:
        raise TextError(f"cannot read {path}: {err.strerror or err}") from None
    if not seen_text:
        raise TextError(f"{path} is empty")


def read_text_prefix(path: Path, max_chars: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> str:
    """The file's text (checked like `iter_text_chunks`), at most `max_chars` characters of it."""
    parts: list[str] = []
    n = 0
    for chunk in iter_text_chunks(path, chunk_bytes):
        parts.append(chunk)
        n += len(chunk)
        if max_chars is not None and n >= max_chars:
            break
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


def _pretoken_cut(tokenizer, text: str, limit: int) -> int:
    """The start of the last pre-token of `text` that starts at or before `limit` (0: none): a place where
    cutting the text leaves every token on both sides as it is in the whole text (a token never crosses a
    pre-token boundary; `limit` keeps the cut away from the end, where pre-tokens may still change)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None) if backend is not None else None
    if pre is not None:
        # The whole text: it starts at a pre-token boundary (the previous cut), so its pre-tokens are the
        # whole file's up to where the text ends changes them (within `margin` of the end).
        # A cut right after whitespace is not safe: alone, the left part's trailing whitespace would be
        # one pre-token (`\s+(?!\S)` at the end of a string) where the whole text splits it.
        cands = [a for _, (a, _b) in pre.pre_tokenize_str(text) if 0 < a <= limit and not text[a - 1].isspace()]
        return cands[-1] if cands else 0
    # No pre-tokenizer to ask: cut before a space that follows a non-space character.
    i = limit
    while i > 0 and not (text[i] == " " and not text[i - 1].isspace()):
        i -= 1
    return i


def iter_token_pieces(path: Path, tokenizer, chunk_bytes: int = CHUNK_BYTES,
                      margin: int = MARGIN_CHARS) -> Iterator[tuple[str, list[int]]]:
    """(text, ids) pieces of the file, in order, each cut at a pre-token boundary: the ids of all pieces
    together are the ids of the whole text (no special tokens). Reads one chunk ahead of what it yields."""
    pending = ""
    chunks = iter_text_chunks(path, chunk_bytes)
    done = False
    while not done:
        try:
            pending += next(chunks)
        except StopIteration:
            done = True
        if done:
            cut = len(pending)
        else:
            cut = _pretoken_cut(tokenizer, pending, len(pending) - margin) if len(pending) > margin else 0
            if cut <= 0:
                continue  # one pre-token longer than what is read so far: read on
        piece, pending = pending[:cut], pending[cut:]
        if piece:
            yield piece, tokenizer(piece, add_special_tokens=False)["input_ids"]


def stream_token_prefix(path: Path, tokenizer, need: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                        margin: int = MARGIN_CHARS) -> tuple[str, array]:
    """(text, ids): a prefix of the file's text, cut at a pre-token boundary, that holds at least `need`
    tokens (the whole text when None or when it is shorter; at most one chunk more than needed), and its
    token ids (no special tokens) as an `array('l')` — the same ids as tokenizing the whole text, cut to
    that prefix. Reads and tokenizes chunk by chunk and stops as soon as `need` tokens are there."""
    out = array("l")
    parts: list[str] = []
    for piece, ids in iter_token_pieces(path, tokenizer, chunk_bytes, margin):
        out.extend(ids)
        parts.append(piece)
        if need is not None and len(out) >= need:
            break
    return "".join(parts), out


def stream_token_ids(path: Path, tokenizer, need: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> array:
    """The text's first `need` token ids (all when None; fewer when the text is shorter)."""
    _, ids = stream_token_prefix(path, tokenizer, need, chunk_bytes)
    if need is not None and len(ids) > need:
        del ids[need:]
    return ids
