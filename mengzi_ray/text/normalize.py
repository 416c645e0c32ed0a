"""The one text normaliser applied to every piece of Chinese text before tokenisation.

Captions, questions, answers and translated tags all pass through :func:`normalize_text`, so the
same string always yields the same tokens whether it came from a dataset file, a tag vocabulary or
an HTTP request.
"""

from __future__ import annotations

import functools

import opencc

# Full-width forms that are converted to ASCII: digits, upper- and lower-case latin letters.
# Full-width punctuation (，！？：；（） ...) is deliberately not in these ranges: in Chinese text
# it is ordinary Chinese punctuation, and the Oscar/AIC-ICC captions keep it as such.
_FULLWIDTH_RANGES = ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
_FULLWIDTH_OFFSET = 0xFEE0  # U+FF10 '０' - U+0030 '0'

_WIDTH_TABLE: dict[int, str] = {
    code: chr(code - _FULLWIDTH_OFFSET)
    for first, last in _FULLWIDTH_RANGES
    for code in range(first, last + 1)
}
_WIDTH_TABLE[0x3000] = " "  # ideographic space


@functools.lru_cache(maxsize=1)
def _t2s_converter() -> opencc.OpenCC:
    """Return the process-wide OpenCC traditional→simplified converter, built on first use.

    Building it loads dictionaries from disk, so it is done once per process and not at import
    time (importing the library must stay cheap, e.g. in Ray workers that never touch text).
    """
    return opencc.OpenCC("t2s")


def normalize_text(text: str) -> str:
    """Normalise Chinese (or mixed) text to the canonical form used throughout mengzi_ray.

    Steps, in order:

    1. Full-width digits ``０-９`` (U+FF10-FF19) and latin letters ``Ａ-Ｚ``/``ａ-ｚ``
       (U+FF21-FF3A, U+FF41-FF5A) become their ASCII forms, and the ideographic space U+3000
       becomes an ASCII space. Full-width punctuation (``，！？：；（）`` etc.) is kept unchanged,
       because it is the normal punctuation of Chinese captions; Chinese punctuation such as
       ``。、「」`` is likewise kept.
    2. Traditional characters are converted to simplified ones with OpenCC's ``t2s`` profile
       (character and phrase level; OpenCC keeps a few characters such as 著 that are also valid
       simplified characters).
    3. Every run of whitespace (any Unicode whitespace, including newlines and tabs) becomes a
       single ASCII space, and leading/trailing whitespace is removed.

    Case is preserved; lower-casing is the tokenizer's job.

    Args:
        text: the text to normalise.

    Returns:
        The normalised text (possibly empty).

    Raises:
        TypeError: if ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_text expects str, got {type(text).__name__}")
    converted = _t2s_converter().convert(text.translate(_WIDTH_TABLE))
    return " ".join(converted.split())
