"""WordPiece vocabularies made from data, and vocab.txt reading/writing.

Real models ship a ``vocab.txt`` (Mengzi-BERT / bert-base-chinese: 21,128 lines). Tests and the
demo train tiny models from scratch and need a small vocabulary covering exactly their texts;
:func:`build_vocab` makes one with the bert-base-chinese layout of special ids, so code that
reads ids from ``vocab.txt`` behaves identically with both.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import normalizers, pre_tokenizers

from mengzi_ray.text.normalize import normalize_text

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)

# bert-base-chinese layout: [PAD]=0, [unused1..99]=1..99, [UNK]=100, [CLS]=101, [SEP]=102,
# [MASK]=103. Keeping it means a data-made vocab and the released one agree on special ids.
_RESERVED: tuple[str, ...] = (
    PAD_TOKEN,
    *(f"[unused{i}]" for i in range(1, 100)),
    UNK_TOKEN,
    CLS_TOKEN,
    SEP_TOKEN,
    MASK_TOKEN,
)


def _word_splitter() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    """Return the normaliser and pre-tokenizer of a lower-casing BERT WordPiece tokenizer.

    These are the very components :func:`mengzi_ray.text.tokenizer.load_tokenizer` installs, so a
    word found here is exactly a word WordPiece will later look up: CJK characters are isolated,
    punctuation characters split off, accents stripped, text lower-cased.
    """
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    return normalizer, pre_tokenizers.BertPreTokenizer()


def build_vocab(
    texts: Iterable[str], min_count: int = 1, extra_tokens: Sequence[str] = ()
) -> list[str]:
    """Build a small WordPiece vocabulary (one token per line of a future vocab.txt) from texts.

    Layout: index 0 ``[PAD]``, 1-99 ``[unused1]``-``[unused99]``, 100 ``[UNK]``, 101 ``[CLS]``,
    102 ``[SEP]``, 103 ``[MASK]`` (the bert-base-chinese ids), then ``extra_tokens`` verbatim in the
    given order, then every word of the texts seen at least ``min_count`` times, ordered by
    descending count and then by code points.

    Words are found after :func:`normalize_text` and the lower-casing BERT pre-tokenisation: each
    CJK character is one word, each punctuation character is one word, and any other run of
    characters (an ASCII word or number) is one whole word. No ``##`` continuation pieces are
    made, so every word is matched whole. With ``min_count=1`` a tokenizer loaded from this
    vocabulary therefore tokenises every normalised source text (for instance through
    :func:`mengzi_ray.text.tokenizer.caption_tokens`) without ``[UNK]`` (except words over 100
    characters, which WordPiece maps to ``[UNK]`` whatever the vocabulary).

    Args:
        texts: the texts to cover (captions, questions, tag strings, ...).
        min_count: words seen fewer times are left out (they will tokenise to ``[UNK]``).
        extra_tokens: tokens that must be present whatever the data (e.g. ``##`` pieces or domain
            words); duplicates of reserved tokens or of each other are skipped.

    Returns:
        The tokens; the index of each is its id.

    Raises:
        ValueError: if ``min_count < 1`` or an extra token is empty or contains whitespace.
        TypeError: if a text is not a ``str``.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    tokens = list(_RESERVED)
    present = set(tokens)
    for token in extra_tokens:
        _check_token(token)
        if token not in present:
            tokens.append(token)
            present.add(token)

    normalizer, pre_tokenizer = _word_splitter()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        normalised = normalizer.normalize_str(normalize_text(text))
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalised))

    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    tokens.extend(word for word, count in ranked if count >= min_count and word not in present)
    return tokens


def _check_token(token: str) -> None:
    """Raise ValueError if ``token`` cannot be one line of a vocab.txt that WordPiece can match."""
    if not isinstance(token, str) or not token:
        raise ValueError(f"vocabulary tokens must be non-empty strings, got {token!r}")
    if any(char.isspace() for char in token):
        raise ValueError(f"vocabulary token {token!r} contains whitespace")


def write_vocab(tokens: Sequence[str], path: str | Path) -> Path:
    """Write ``tokens`` as a vocab.txt: UTF-8, one token per line, line index = token id.

    Parent directories are created. The file ends with a newline.

    Args:
        tokens: the vocabulary, in id order.
        path: the file to write (normally ``<model dir>/vocab.txt``).

    Returns:
        The path written.

    Raises:
        ValueError: if a token is empty, contains whitespace, or occurs twice (a duplicate would
            make two ids share one token and break the line-index = id contract).
    """
    seen: set[str] = set()
    for token in tokens:
        _check_token(token)
        if token in seen:
            raise ValueError(f"duplicate vocabulary token {token!r}")
        seen.add(token)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    return target


def read_vocab(path: str | Path) -> list[str]:
    """Read a vocab.txt into its list of tokens; list index = token id.

    Lines are split on ``\\n`` only (a trailing ``\\r`` is dropped), the way the WordPiece loader
    reads the file, so Unicode line separators inside a token do not shift ids. A final newline
    does not add an empty token.

    Args:
        path: the vocab.txt file.

    Returns:
        The tokens in file order.

    Raises:
        FileNotFoundError: if the file does not exist.
        UnicodeDecodeError: if it is not UTF-8.
    """
    text = Path(path).read_bytes().decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]
