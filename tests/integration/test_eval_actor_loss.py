"""Retrieval pair scoring on a Ray Data actor pool (local Ray): the scores are bit-identical to the in-process loop,
and a scoring actor that dies mid-evaluation changes none of them and loses no pair."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mengzi_ray.evaluation.retrieval_eval import CrossPairs, PairScorer, build_gallery, score_pairs
from tests.unit.test_eval_pair_scoring import REFS, _regions, model_dir  # noqa: F401  (the tiny-model fixture)


def test_a_scoring_actor_killed_mid_evaluation_changes_no_score(ray_local, model_dir, tmp_path: Path) -> None:  # noqa: F811
    gallery = build_gallery(list(REFS), REFS, _regions(1), captions_per_image=2)
    pairs = CrossPairs(gallery.num_images, gallery.num_texts)
    marker, claimed = tmp_path / "die-once", tmp_path / "died"
    marker.write_text("armed")

    def claim_the_death() -> bool:
        """True in the one actor whose rename of the marker wins: two actors can reach their second chunk together."""
        try:
            marker.rename(claimed)
        except FileNotFoundError:
            return False
        return True

    class DiesOnce(PairScorer):
        """Kills its own process on its second chunk if it claims the marker (once across actors and restarts)."""

        calls = 0

        def score(self, lo: int, hi: int):
            self.calls += 1
            if self.calls == 2 and claim_the_death():
                os._exit(1)
            return super().score(lo, hi)

    kwargs = {"num_actors": 2, "chunk_size": 4, "batch_size": 2, "num_cpus_per_actor": 0.5}
    survived = score_pairs(str(model_dir), gallery, pairs, scorer_cls=DiesOnce, **kwargs)
    assert claimed.exists() and not marker.exists(), "the injected actor death did not happen"
    reference = score_pairs(str(model_dir), gallery, pairs, **kwargs)
    assert survived.shape == (pairs.num_pairs,) and not np.isnan(survived).any()
    np.testing.assert_array_equal(survived, reference)
    in_process = PairScorer(str(model_dir), gallery, pairs, 2, False).score(0, pairs.num_pairs)[1]
    np.testing.assert_array_equal(reference, in_process)  # the actor pool changes no bit
