"""llm_judge against real judge servers on 127.0.0.1 (http.server in a thread): a deterministic judge, one
without JSON mode, one answering garbage, one failing then recovering, one that is down, and ones that answer
outside the bounds every OpenAI-compatible server is held to (trickling bytes, sending megabytes)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mergegate.errors import EvaluationError
from mergegate.evaluate.evaluators import LlmJudge, Observation, parse_verdict
from mergegate.evaluate.suite import SuiteRow
from mergegate.serving.launcher import free_port

RUBRIC = "The answer must mention Oslo."


class Judge(BaseHTTPRequestHandler):
    """Passes an answer that contains the rubric's last word; `mode` on the server picks a misbehaviour."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append((self.path, dict(self.headers), body))
        mode = server.mode
        if mode == "flaky" and len(server.requests) == 1:
            return self.reply(503, {"error": "warming up"})
        if mode in ("trickle", "huge"):
            return self.unbounded(mode)
        if mode == "no_json_mode" and "response_format" in body:
            return self.reply(400, {"error": {"message": "response_format is not supported"}})
        prompt = body["messages"][0]["content"]
        rubric = prompt.split("Rubric:\n")[1].split("\n")[0]
        answer = prompt.split("Answer:\n")[1]
        keyword = rubric.rstrip(".").split()[-1]
        verdict = {"verdict": "pass" if keyword in answer else "fail", "score": 1.0 if keyword in answer else 0.1,
                   "reason": f"{'mentions' if keyword in answer else 'does not mention'} {keyword}"}
        content = {"garbage": "I think it is fine!!", "no_json_mode": f"Sure:\n```json\n{json.dumps(verdict)}\n```"}.get(
            mode, json.dumps(verdict))
        self.reply(200, {"id": "j1", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def unbounded(self, mode: str) -> None:
        """A passing verdict after 3 MiB of blanks (`huge`), or after 400 blanks sent one every 0.1 s (`trickle`)."""
        verdict = json.dumps({"verdict": "pass", "score": 1.0, "reason": "ok"})
        answer = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]}).encode()
        blanks = 3 * 1024 * 1024 if mode == "huge" else 400
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(blanks + len(answer)))
        self.end_headers()
        try:
            if mode == "huge":
                self.wfile.write(b" " * blanks)
            else:
                for _ in range(blanks):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            self.wfile.write(answer)
        except (BrokenPipeError, ConnectionResetError):  # the judge's caller gave up on it
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    server.mode, server.requests = "ok", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def row(**fields) -> SuiteRow:
    return SuiteRow.model_validate({"id": "j", "cohort": "c", "prompt": "Where is the meeting?", "expected": "",
                                    "evaluators": ["llm_judge"], "rubric": RUBRIC, **fields})


@pytest.mark.slow
def test_judge_from_the_environment_grades_and_its_answer_is_kept(judge_server, monkeypatch):
    monkeypatch.setenv("MERGEGATE_JUDGE_URL", url(judge_server))
    monkeypatch.setenv("MERGEGATE_JUDGE_MODEL", "judge-1")
    monkeypatch.setenv("MERGEGATE_JUDGE_API_KEY", "sk-test")
    good = LlmJudge(timeout_s=5)(row(), Observation("In Oslo, room 4."))
    bad = LlmJudge(timeout_s=5)(row(), Observation("In Bergen."))
    assert (good.passed, good.score, bad.passed, bad.score) == (True, 1.0, False, 0.1)
    assert good.reason.startswith("judge pass (1.00): mentions Oslo; ")
    record = json.loads(good.reason.split("; ", 1)[1])
    assert record["judge_model"] == "judge-1" and record["rubric"] == RUBRIC
    assert json.loads(record["judge_raw"])["verdict"] == "pass"
    path, headers, body = judge_server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["response_format"] == {"type": "json_object"}
    assert body["temperature"] == 0


@pytest.mark.slow
def test_row_settings_override_the_environment(judge_server, monkeypatch):
    monkeypatch.setenv("MERGEGATE_JUDGE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("ROW_KEY", "sk-row")
    settings = {"base_url": url(judge_server), "model": "row-judge", "api_key_env": "ROW_KEY", "timeout_s": 5}
    result = LlmJudge()(row(judge=settings), Observation("Oslo"))
    assert result.passed
    _, headers, body = judge_server.requests[0]
    assert body["model"] == "row-judge" and headers["Authorization"] == "Bearer sk-row"


@pytest.mark.slow
def test_judge_without_json_mode_is_asked_again_and_parsed_leniently(judge_server):
    judge_server.mode = "no_json_mode"
    result = LlmJudge(base_url=url(judge_server), model="j", timeout_s=5)(row(), Observation("Oslo"))
    assert result.passed
    assert [("response_format" in b) for _, _, b in judge_server.requests] == [True, False]


@pytest.mark.slow
def test_garbage_verdict_fails_the_row_with_the_raw_answer(judge_server):
    judge_server.mode = "garbage"
    result = LlmJudge(base_url=url(judge_server), model="j", timeout_s=5)(row(), Observation("Oslo"))
    assert (result.passed, result.score) == (False, 0.0)
    assert result.reason.startswith("judge answer unusable: no JSON object with a verdict")
    assert "I think it is fine!!" in result.reason


@pytest.mark.slow
def test_a_failing_judge_is_retried(judge_server):
    judge_server.mode = "flaky"
    result = LlmJudge(base_url=url(judge_server), model="j", timeout_s=5, retries=1)(row(), Observation("Oslo"))
    assert result.passed and len(judge_server.requests) == 2


@pytest.mark.slow
def test_a_judge_that_is_down_stops_the_evaluation_naming_it():
    port = free_port()  # nobody listens on it
    judge = LlmJudge(base_url=f"http://127.0.0.1:{port}/v1", model="judge-x", timeout_s=2, retries=1)
    with pytest.raises(EvaluationError, match=r"judge 'judge-x' at http://127\.0\.0\.1:\d+/v1/chat/completions did "
                                              r"not answer after 2 attempt\(s\) \(ConnectError"):
        judge(row(), Observation("Oslo"))


def test_no_judge_configured_is_an_evaluation_error(monkeypatch):
    monkeypatch.delenv("MERGEGATE_JUDGE_URL", raising=False)
    monkeypatch.delenv("MERGEGATE_JUDGE_MODEL", raising=False)
    with pytest.raises(EvaluationError, match="llm_judge has no judge; set MERGEGATE_JUDGE_URL"):
        LlmJudge()(row(), Observation("Oslo"))


def test_rubric_is_required_and_judge_settings_validated():
    with pytest.raises(ValueError, match="evaluator 'llm_judge' needs a 'rubric'"):
        row(rubric=" ")
    with pytest.raises(ValueError, match="base_url"):
        row(judge={"base_url": "ftp://x"})


@pytest.mark.parametrize(("text", "verdict"), [
    ('{"verdict": "PASS", "score": 0.8, "reason": "ok"}', {"verdict": "pass", "score": 0.8, "reason": "ok"}),
    ('Verdict below.\n{"verdict": "fail"}', {"verdict": "fail", "score": 0.0, "reason": ""}),
])
def test_parse_verdict_is_lenient_about_wrapping(text, verdict):
    assert parse_verdict(text) == (verdict, "")


@pytest.mark.parametrize(("text", "why"), [
    ('{"verdict": "maybe"}', "neither 'pass' nor 'fail'"), ('{"verdict": "pass", "score": 7}', "not a number"),
    ("[1, 2]", "no JSON object"),
])
def test_parse_verdict_refuses_what_is_not_a_verdict(text, why):
    assert why in parse_verdict(text)[1]


@pytest.mark.slow
def test_a_judge_trickling_its_answer_is_a_timeout_not_a_wait_without_end(judge_server):
    judge_server.mode = "trickle"  # 40 s of bytes, each well within any read timeout
    judge = LlmJudge(base_url=url(judge_server), model="j", timeout_s=2, retries=0)
    with pytest.raises(EvaluationError, match=r"did not answer after 1 attempt\(s\) \(no complete answer within 2 s\)"):
        judge(row(), Observation("Oslo"))


@pytest.mark.slow
def test_a_judge_sending_megabytes_is_refused(judge_server):
    judge_server.mode = "huge"
    judge = LlmJudge(base_url=url(judge_server), model="j", timeout_s=30, retries=0)
    with pytest.raises(EvaluationError, match=r"judge 'j' at .*: the answer passed [\d,]+ bytes, the most accepted "
                                              r"for a verdict; refused"):
        judge(row(), Observation("Oslo"))


@pytest.mark.slow
def test_the_judge_reads_no_proxy_settings_from_the_environment(judge_server, monkeypatch):
    dead = free_port()  # a proxy nobody runs: a request sent to it would fail
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    result = LlmJudge(base_url=url(judge_server), model="j", timeout_s=5, retries=0)(row(), Observation("Oslo"))
    assert result.passed and len(judge_server.requests) == 1
