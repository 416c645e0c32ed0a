"""CIDEr-D, the SCST reward (Vedantam et al. 2015; microsoft/Oscar `oscar/run_captioning.py` `scst_train_iter`).

Definition implemented here, per candidate ``c`` with references ``S`` (all texts already space-tokenised; n-grams
are taken over ``text.split()``, so Chinese must arrive as space-separated characters or words):

* for every order ``k = 1..n`` (n = 4) each sentence becomes a vector ``g_k`` with one entry per k-gram:
  ``count × idf``, ``idf = log(N) − log(max(1, df))``, where ``df`` is the number of training *images* whose
  reference set contains the k-gram and ``N`` is the number of training images. Unseen n-grams get the full
  ``log(N)``. Raw counts are used as term frequency (as the reference implementations do; a per-sentence
  normalisation would cancel in the cosine anyway except under clipping).
* ``sim_k(c, s) = Σ min(g_k(c), g_k(s)) · g_k(s) / (‖g_k(c)‖ · ‖g_k(s)‖) · exp(−(l_c − l_s)² / (2σ²))``, σ = 6.
  The ``min`` clips candidate counts at the reference counts, while the candidate norm stays unclipped, so
  repeating a word beyond its reference count can only lower the score.
* ``CIDEr-D(c, S) = 10 · mean_k mean_{s∈S} sim_k(c, s)``.

Length ``l`` is the number of tokens (the paper's definition). Oscar's copy (like pycocoevalcap's scorer) counts
bigrams instead, i.e. ``max(len − 1, 0)``; for n ≥ 2 that quirk never changes a score: two non-empty sentences
have the same length difference either way, and an empty sentence has no n-grams, so its cosine is 0 whatever the
penalty. It is therefore not offered as an option.

Document frequencies come from a training reference corpus once (:meth:`CiderD.from_references`) and travel to
workers as JSON (:meth:`CiderD.to_dict` / :meth:`CiderD.from_dict`); nothing here is pickled. The caller owns
sentence preprocessing (Oscar strips a trailing "." and appends " <eos>" before scoring).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

NGram = tuple[str, ...]

_FORMAT = "mengzi_ray.cider_d"
_VERSION = 1


class _SentenceVector:
    """tf-idf weights of one sentence, split by n-gram order, with per-order norms and the penalty length."""

    __slots__ = ("weights", "norms", "length")

    def __init__(self, weights: list[dict[NGram, float]], length: int) -> None:
        self.weights = weights
        self.norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        self.length = length


class CiderD:
    """CIDEr-D scorer with a fixed document-frequency table.

    Args:
        document_frequency: n-gram (tuple of tokens, order 1..n) → number of training images whose references
            contain it; every value must lie in ``1..num_docs``.
        num_docs: number of training images (documents) the table was counted over, ``N`` in ``log(N)``.
        n: highest n-gram order (4 in CIDEr-D).
        sigma: standard deviation of the Gaussian length penalty (6 in CIDEr-D).
    """

    def __init__(
        self,
        document_frequency: Mapping[NGram, int],
        num_docs: int,
        n: int = 4,
        sigma: float = 6.0,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if num_docs < 1:
            raise ValueError(f"num_docs must be >= 1, got {num_docs}")
        for ngram, df in document_frequency.items():
            if not 1 <= len(ngram) <= n:
                raise ValueError(f"n-gram {ngram!r} has order {len(ngram)}, outside 1..{n}")
            if not 1 <= df <= num_docs:
                raise ValueError(f"document frequency of {ngram!r} is {df}, outside 1..{num_docs}")
        self.document_frequency: dict[NGram, int] = dict(document_frequency)
        self.num_docs = num_docs
        self.n = n
        self.sigma = float(sigma)
        self._log_num_docs = math.log(num_docs)

    @classmethod
    def from_references(
        cls,
        refs: Mapping[str, Sequence[str]],
        n: int = 4,
        sigma: float = 6.0,
    ) -> CiderD:
        """Count document frequencies over a training corpus: one document per image id, i.e. the union of
        the n-grams of all its (space-tokenised) reference sentences. Raises ValueError on an empty corpus or an
        image with no references."""
        if not refs:
            raise ValueError("cannot build CIDEr-D document frequencies from an empty reference corpus")
        df: Counter[NGram] = Counter()
        for image_id, sentences in refs.items():
            _check_sentences(sentences, f"references of image {image_id!r}")
            doc: set[NGram] = set()
            for sentence in sentences:
                doc.update(_ngram_counts(sentence.split(), n))
            df.update(doc)
        return cls(df, num_docs=len(refs), n=n, sigma=sigma)

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """Per-candidate CIDEr-D (float64, shape ``(len(candidates),)``); ``references[i]`` are the
        space-tokenised references of ``candidates[i]``. Raises ValueError on a length mismatch or an empty
        reference list."""
        if isinstance(candidates, str):
            raise TypeError("candidates must be a sequence of sentences, not one string")
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        # SCST scores several samples against the same references; vectorise each distinct sentence once.
        cache: dict[str, _SentenceVector] = {}
        out = np.zeros(len(candidates), dtype=np.float64)
        for i, (candidate, refs) in enumerate(zip(candidates, references)):
            _check_sentences(refs, f"references of candidate {i}")
            cand_vec = self._cached_vector(candidate, cache)
            per_order = np.zeros(self.n, dtype=np.float64)
            for ref in refs:
                per_order += self._similarity(cand_vec, self._cached_vector(ref, cache))
            out[i] = 10.0 * float(per_order.mean()) / len(refs)
        return out

    def corpus_score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Mean of :meth:`score` over the candidates (0 candidates → ValueError)."""
        if len(candidates) == 0:
            raise ValueError("corpus_score needs at least one candidate")
        return float(self.score(candidates, references).mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; n-grams become their tokens joined by one space (tokens never hold spaces)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "n": self.n,
            "sigma": self.sigma,
            "num_docs": self.num_docs,
            "document_frequency": {" ".join(ngram): df for ngram, df in self.document_frequency.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CiderD:
        """Inverse of :meth:`to_dict`; rejects other formats or versions."""
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(
                f"not a {_FORMAT} v{_VERSION} table: format={data.get('format')!r} version={data.get('version')!r}"
            )
        table = {tuple(key.split(" ")): int(df) for key, df in data["document_frequency"].items()}
        return cls(table, num_docs=int(data["num_docs"]), n=int(data["n"]), sigma=float(data["sigma"]))

    def _cached_vector(self, sentence: str, cache: dict[str, _SentenceVector]) -> _SentenceVector:
        vec = cache.get(sentence)
        if vec is None:
            vec = self._vector(sentence)
            cache[sentence] = vec
        return vec

    def _vector(self, sentence: str) -> _SentenceVector:
        tokens = sentence.split()
        weights: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        for ngram, count in _ngram_counts(tokens, self.n).items():
            idf = self._log_num_docs - math.log(max(1, self.document_frequency.get(ngram, 0)))
            weights[len(ngram) - 1][ngram] = count * idf
        return _SentenceVector(weights, len(tokens))

    def _similarity(self, cand: _SentenceVector, ref: _SentenceVector) -> np.ndarray:
        delta = cand.length - ref.length
        penalty = math.exp(-(delta * delta) / (2.0 * self.sigma * self.sigma))
        sims = np.zeros(self.n, dtype=np.float64)
        for k in range(self.n):
            denom = cand.norms[k] * ref.norms[k]
            if denom == 0.0:
                continue
            ref_weights = ref.weights[k]
            dot = 0.0
            for ngram, w in cand.weights[k].items():
                r = ref_weights.get(ngram)
                if r is not None:
                    dot += min(w, r) * r
            sims[k] = dot / denom * penalty
        return sims


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter[NGram]:
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def _check_sentences(sentences: Sequence[str], what: str) -> None:
    if isinstance(sentences, str):
        raise TypeError(f"{what} must be a sequence of sentences, not one string")
    if len(sentences) == 0:
        raise ValueError(f"{what} are empty")
