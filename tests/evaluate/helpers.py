"""Plain helpers for tests that evaluate through a server (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from mergegate.evaluate import load_suite

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


def demo_rows(per_cohort: int = 2) -> list[dict]:
    """The demo suite's first `per_cohort` rows of each cohort, without its perplexity rows (a server has no
    likelihoods to give)."""
    rows, seen = [], {}
    for line in (DEMO / "suite.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "perplexity" in row["evaluators"] or seen.get(row["cohort"], 0) >= per_cohort:
            continue
        seen[row["cohort"]] = seen.get(row["cohort"], 0) + 1
        rows.append(row)
    return rows


def tiny_suite(tmp_path, evaluators=("exact_match",)):
    """A one-row suite ("6*7=" → "42") the Scripted server answers."""
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps({"id": "a", "cohort": "c", "prompt": "6*7=", "expected": "42",
                                "evaluators": list(evaluators)}) + "\n")
    return load_suite(path)


class Scripted:
    """A tiny OpenAI-compatible server: /v1/models reports `identity`; a completion naming another model is a 404
    (as vLLM answers it); the first `busy` completions answer 429 with Retry-After, the rest the reply."""

    def __init__(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.identity = {"id": "m", "object": "model", "owned_by": "me", "created": 1, "fingerprint": "a"}
        self.busy, self.calls, self.lock = 0, 0, threading.Lock()
        app = self.app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [dict(self.identity)]}

        @app.post("/v1/completions")
        def completions(body: dict):
            if body.get("model") != self.identity["id"]:
                return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist."}},
                                    status_code=404)
            with self.lock:
                self.calls += 1
                busy = self.busy > 0
                self.busy -= busy
            if busy:
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                    headers={"Retry-After": "0.3"})
            assert body["temperature"] == 0 and body["n"] == 1 and body["max_tokens"] >= 1
            return {"id": "x", "object": "text_completion", "model": "m",
                    "choices": [{"index": 0, "text": "42", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
