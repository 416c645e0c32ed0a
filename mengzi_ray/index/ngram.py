"""The TF-IDF first stage: character n-grams of Chinese text, for models without a dual encoder.

Text → images matches a query against each image's tag string; image → captions matches an image's tag string
against each caption. Both sides are plain Chinese text after the one normaliser, so the index is a sparse
matrix product (milliseconds for 10^4 images). Serve's `RetrievalEngine` shortlists with it; the evaluate job
reports its own R@K and its two-stage R@K beside the dual encoder's (evaluation/two_stage.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from mengzi_ray.text import normalize_text

_NOT_WORD = re.compile(r"[^\w]+")


def char_ngrams(text: str) -> list[str]:
    """Character unigrams and bigrams of the normalised text (punctuation and spaces are boundaries)."""
    grams: list[str] = []
    for piece in _NOT_WORD.split(normalize_text(text).lower()):
        grams.extend(piece)
        grams.extend(piece[i : i + 2] for i in range(len(piece) - 1))
    return grams


class NgramIndex:
    """TF-IDF (sublinear tf, smoothed idf, L2-normalised rows) over character n-grams of a list of documents."""

    def __init__(self, documents: Sequence[str]):
        counts = [Counter(char_ngrams(doc)) for doc in documents]
        self.vocabulary: dict[str, int] = {}
        for counter in counts:
            for gram in counter:
                self.vocabulary.setdefault(gram, len(self.vocabulary))
        df = np.zeros(len(self.vocabulary), dtype=np.float64)
        for counter in counts:
            for gram in counter:
                df[self.vocabulary[gram]] += 1
        self.idf = np.log((1 + len(documents)) / (1 + df)) + 1.0
        self.matrix = self._vectors(counts)

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def _vectors(self, counts: Sequence[Counter]) -> sp.csr_matrix:
        """L2-normalised TF-IDF rows of n-gram counts; n-grams outside the vocabulary are dropped."""
        rows, cols, vals = [], [], []
        for row, counter in enumerate(counts):
            for gram, count in counter.items():
                col = self.vocabulary.get(gram)
                if col is not None:
                    rows.append(row)
                    cols.append(col)
                    vals.append((1.0 + math.log(count)) * self.idf[col])
        matrix = sp.csr_matrix((vals, (rows, cols)), shape=(len(counts), len(self.vocabulary)), dtype=np.float64)
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return (sp.diags(1.0 / norms) @ matrix).tocsr()

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), len(documents)) float64 cosine similarities of each text with each document."""
        return np.asarray((self._vectors([Counter(char_ngrams(t)) for t in texts]) @ self.matrix.T).todense())

    def query(self, text: str, k: int) -> np.ndarray:
        """Indices of the k best documents, best first (ties keep document order)."""
        scores = self.scores([text])[0]
        return np.argsort(-scores, kind="stable")[: min(k, len(scores))]
