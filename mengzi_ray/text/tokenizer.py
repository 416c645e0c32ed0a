"""The BERT WordPiece tokenizer of a model dir, and caption tokenising/decoding.

Oscar uses the ``BertTokenizer`` of its init model (Mengzi-BERT-base / bert-base-chinese,
lower-cased): every CJK character is its own token, other words go through WordPiece. Ids are
always the line indices of the model dir's ``vocab.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mengzi_ray.text.normalize import normalize_text
from mengzi_ray.text.vocab import SPECIAL_TOKENS, read_vocab

if TYPE_CHECKING:
    from transformers import BertTokenizer

VOCAB_FILE = "vocab.txt"

# CJK ideograph blocks, the same set BERT's tokenizer isolates character by character.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def load_tokenizer(model_dir: str | Path, do_lower_case: bool = True) -> BertTokenizer:
    """Build the BERT WordPiece tokenizer described by ``<model_dir>/vocab.txt``.

    Only ``vocab.txt`` is read (tokenizer.json / tokenizer_config.json are ignored, so the
    original Oscar and Mengzi dirs and our own model dirs load the same way). CJK characters are
    tokenised one by one (``tokenize_chinese_chars=True``).

    The result is checked against the file, because some transformers constructors silently fall
    back to a 5-token vocabulary in which every Chinese character is ``[UNK]``: the tokenizer must
    hold exactly one id per line of vocab.txt, and ``[PAD] [UNK] [CLS] [SEP] [MASK]`` must map to
    their line indices.

    Args:
        model_dir: directory holding ``vocab.txt``.
        do_lower_case: lower-case (and strip accents from) input text, as Oscar's
            ``--do_lower_case`` does.

    Returns:
        A ``transformers.BertTokenizer``.

    Raises:
        FileNotFoundError: if ``<model_dir>/vocab.txt`` does not exist.
        ValueError: if vocab.txt lacks a special token, or the built tokenizer disagrees with the
            file (size or special-token ids).
    """
    # transformers is imported here, not at module level: importing it takes seconds, and the
    # tag vocabulary and normaliser of this package are used by processes that never tokenise.
    from transformers import BertTokenizer

    vocab_path = Path(model_dir) / VOCAB_FILE
    if not vocab_path.is_file():
        raise FileNotFoundError(
            f"{vocab_path} not found: a model dir needs {VOCAB_FILE} (one WordPiece token per line)"
        )
    tokens = read_vocab(vocab_path)
    line_of = {token: tokens.index(token) for token in SPECIAL_TOKENS if token in tokens}
    missing = [token for token in SPECIAL_TOKENS if token not in line_of]
    if missing:
        raise ValueError(f"{vocab_path}: special tokens missing from the vocabulary: {missing}")

    tokenizer = BertTokenizer(
        vocab=str(vocab_path), do_lower_case=do_lower_case, tokenize_chinese_chars=True
    )
    if len(tokenizer) != len(tokens):
        raise ValueError(
            f"{vocab_path}: tokenizer has {len(tokenizer)} tokens but the file has {len(tokens)}"
            " lines (duplicate or blank lines?)"
        )
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != line_of[token]:
            raise ValueError(
                f"{vocab_path}: {token} has id {token_id} in the tokenizer but is on line index"
                f" {line_of[token]}"
            )
    return tokenizer


def caption_tokens(tokenizer: BertTokenizer, text: str) -> list[str]:
    """Normalise ``text`` with :func:`normalize_text`, then split it into WordPiece tokens.

    Args:
        tokenizer: a tokenizer from :func:`load_tokenizer`.
        text: a caption, question, answer or tag string.

    Returns:
        The tokens, without ``[CLS]``/``[SEP]``.

    Raises:
        TypeError: if ``text`` is not a ``str``.
    """
    return tokenizer.tokenize(normalize_text(text))


def decode_caption(tokenizer: BertTokenizer, ids: Sequence[int]) -> str:
    """Turn token ids back into a Chinese caption as a person would write it.

    Special tokens (``[PAD] [UNK] [CLS] [SEP] [MASK]``, i.e. the tokenizer's special tokens) are
    dropped, as Oscar's decoding does; ``##`` pieces are glued to the preceding piece. Unlike
    Oscar, which joins all tokens with spaces (``两 个 人 骑 马``), words are joined with no space,
    except that a single space separates two words whose touching characters are both non-CJK
    letters or digits (tokens ``一 个 ipad 在 桌 上`` → ``一个ipad在桌上``; ``red bus`` stays
    ``red bus``).

    Args:
        tokenizer: a tokenizer from :func:`load_tokenizer`.
        ids: token ids, e.g. a generated sequence.

    Returns:
        The caption text (possibly empty).

    Raises:
        ValueError: if an id is outside the vocabulary.
    """
    size = len(tokenizer)
    bad = [token_id for token_id in ids if not 0 <= token_id < size]
    if bad:
        raise ValueError(f"token ids outside the vocabulary of {size}: {bad[:10]}")
    skipped = set(tokenizer.all_special_tokens)
    words: list[str] = []
    for token in tokenizer.convert_ids_to_tokens(list(ids)):
        if token in skipped:
            continue
        if token.startswith("##") and len(token) > 2:
            piece = token[2:]
            if words:
                words[-1] += piece
            else:
                words.append(piece)
        else:
            words.append(token)

    text = ""
    for word in words:
        if text and _is_word_char(text[-1]) and _is_word_char(word[0]):
            text += " "
        text += word
    return text


def _is_cjk(char: str) -> bool:
    """Return whether ``char`` is a CJK ideograph (one that BERT tokenises on its own)."""
    code = ord(char)
    return any(first <= code <= last for first, last in _CJK_RANGES)


def _is_word_char(char: str) -> bool:
    """Return whether ``char`` is a letter or digit of a space-separated script (not CJK)."""
    return char.isalnum() and not _is_cjk(char)
