"""The classifier's cache and batching change its cost, never its decisions: concurrent texts share one `embed`
call, repeated texts none, and each text gets the cohort it gets when classified alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mergegate.gateway.classifier import CohortClassifier, minilm_embedder

from .helpers import SQL, WEATHER

ASKED = ["Is it going to snow in Berlin on Friday?", "Write SQL to count orders grouped by region.",
         "My grandmother's apple pie recipe uses cinnamon and butter.", "Will it be windy in Oslo tomorrow?",
         "Is it going to snow in Berlin on Friday?", "Write SQL to count orders grouped by region.",
         "Select every customer without an order in SQL.", "Is it going to snow in Berlin on Friday?"]


def letters(texts) -> np.ndarray:
    """A cheap deterministic embedder: normalised letter counts (the classifier takes any `Embed`)."""
    vectors = np.zeros((len(texts), 26), dtype=np.float32)
    for row, text in enumerate(texts):
        for ch in text.lower():
            if "a" <= ch <= "z":
                vectors[row, ord(ch) - 97] += 1
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def decide(embed, threshold: float) -> tuple[list, list, CohortClassifier]:
    prompts = {"weather": WEATHER, "sql": SQL}
    alone = CohortClassifier(prompts, embed, threshold, cache_size=0)
    one_by_one = [alone.classify_many([text])[0] for text in ASKED]
    batched = CohortClassifier(prompts, embed, threshold)

    async def together():
        return await asyncio.gather(*(batched.classify_async(text) for text in ASKED))

    return one_by_one, asyncio.run(together()), batched


def test_concurrent_texts_share_an_encode_and_repeats_hit_the_cache():
    one_by_one, together, classifier = decide(letters, 0.5)
    assert [c.cohort for c in together] == [c.cohort for c in one_by_one]
    assert (classifier.encodes, classifier.encoded) == (1, len(set(ASKED)))  # one batch, repeats encoded once
    assert classifier.classify(ASKED[0]) == together[0] and classifier.encodes == 1  # from the cache


def test_the_cache_is_bounded_and_keeps_the_recently_used():
    classifier = CohortClassifier({"weather": WEATHER, "sql": SQL}, letters, 0.5, cache_size=2)
    for text in ("a", "b", "a", "c"):
        classifier.classify(text)
    assert list(classifier._cache) == ["a", "c"]


@pytest.mark.slow
@pytest.mark.one_torch_thread
def test_minilm_decides_the_same_alone_cached_and_batched():
    one_by_one, together, _ = decide(minilm_embedder(), 0.35)
    assert [c.cohort for c in together] == [c.cohort for c in one_by_one]
    assert [c.cohort for c in together][:3] == ["weather", "sql", None]
    np.testing.assert_allclose([c.score for c in together], [c.score for c in one_by_one], atol=1e-4)
