"""Text handling for mengzi_ray: normalisation, WordPiece tokenizer, vocabularies, Chinese tags.

* :func:`normalize_text` is the single normaliser for all Chinese text (OpenCC t2s, full-width
  digits/latin to ASCII, whitespace collapsed).
* :func:`load_tokenizer` builds the BERT WordPiece tokenizer of a model dir from its vocab.txt and
  verifies it; :func:`caption_tokens` / :func:`decode_caption` go text → tokens → text.
* :func:`build_vocab` / :func:`write_vocab` / :func:`read_vocab` make and read vocab.txt files.
* :class:`TagVocabulary` translates detector class names to Chinese tags; :func:`tag_string`
  joins tags into Oscar's object-label string.

Importing this package does not import transformers (that happens in :func:`load_tokenizer`).
"""

from mengzi_ray.text.normalize import normalize_text
from mengzi_ray.text.tags import TagTranslation, TagVocabulary, tag_string
from mengzi_ray.text.tokenizer import VOCAB_FILE, caption_tokens, decode_caption, load_tokenizer
from mengzi_ray.text.vocab import SPECIAL_TOKENS, build_vocab, read_vocab, write_vocab

__all__ = [
    "SPECIAL_TOKENS",
    "VOCAB_FILE",
    "TagTranslation",
    "TagVocabulary",
    "build_vocab",
    "caption_tokens",
    "decode_caption",
    "load_tokenizer",
    "normalize_text",
    "read_vocab",
    "tag_string",
    "write_vocab",
]
