"""Gateway options: request limits, timeouts, breaker and mirror bounds. One frozen dataclass, all defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    # request limits (4xx when exceeded)
    max_body_bytes: int = 1 << 20  # 413 above this (JSON depth and number literals are bounded too: bodies.py)
    max_admin_body_bytes: int = 64 << 10  # the same for /admin bodies
    max_prompt_tokens: int = 4096  # 400 context_length_exceeded above this (counted by the route's backends)
    # 400 context_length_exceeded above this many characters of prompt (all messages' text together), checked
    # before anything tokenizes it: tokenizing costs time in proportion to the text (16 characters a token here)
    max_prompt_chars: int = 65536
    max_tokens_limit: int = 1024  # largest max_tokens a caller may ask for
    default_max_tokens: int = 128  # when the request names none
    # backends
    # Seconds a backend may take to answer a call, counted from when it starts on it (time waiting in a local
    # model's queue is load, not failure, and is not counted); for a stream, to its first token and then
    # between two tokens — a stream that keeps sending may run longer.
    backend_timeout: float = 60.0
    stream_max_duration: float | None = None  # optional cap on a whole streamed answer (off by default)
    # requests waiting for one backend (a local model serves one at a time, an upstream 64 at a time); more are
    # shed: the next model in the chain answers, else 429 with Retry-After
    local_queue_limit: int = 64
    # where local models run: "cpu", "cuda" or "cuda:N" (bf16 on CUDA, fp32 on CPU); None: cuda when a GPU is
    # available, else cpu
    device: str | None = None
    # circuit breaker, per backend
    breaker_failures: int = 3  # consecutive failures that open it
    breaker_cooldown: float = 30.0  # seconds open before one probe is let through (half-open)
    # mirroring to the candidate
    mirror_concurrency: int = 4  # mirrored calls in flight; more are dropped, not queued
    mirror_timeout: float = 60.0
    # routing
    classifier_threshold: float = 0.35  # cosine to the nearest cohort centroid below which the default route serves
    fallback_on_refusal: bool = False  # a refusal on a `refusal`-checked route is recorded; fall over only if True
    # admin
    persist_plan: bool = False  # write admin route changes back to the plan file (needs plan_path)
