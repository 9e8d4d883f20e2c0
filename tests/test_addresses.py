"""One rule for a url and one for a port, wherever either is read: a models file's `base_url`, a rollout plan's
`url`, a `NAME=URL` spelling and any ModelRef all refuse the same urls with the same words (addresses.check_url);
every `--port` refuses the same ports (addresses.check_port), and a busy port is refused before anything loads
(addresses.bind_port)."""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from mergegate.addresses import bind_port, check_port, check_url
from mergegate.errors import AddressError, EvaluationError, ModelRefError, PlanError, SuiteError
from mergegate.evaluate.suite import load_suite
from mergegate.model_ref import ModelRef, load_models_file
from mergegate.rollout import load_plan

BAD_URLS = {
    "file:///etc/passwd": "the scheme must be http or https, not 'file'",
    "ftp://127.0.0.1/v1": "the scheme must be http or https, not 'ftp'",
    "http:///v1": "the url has no host",
    "http://127.0.0.1:0/v1": "port 0 is out of range",
    "http://127.0.0.1:70000/v1": "Port out of range",
    "http://user:hunter2@127.0.0.1/v1": "a url cannot carry credentials",
    "http://127.0.0.1/v 1": "a url cannot contain spaces",
}


def _plan_file(tmp_path, url: str):
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump({"candidate": "m", "models": {"m": {"url": url}}, "routes": {},
                                    "default": {"model": "m"}}))
    return path


def _models_file(tmp_path, url: str):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"base_url": url}}}))
    return path


def _judged_suite(tmp_path, url: str | None):
    path = tmp_path / "suite.jsonl"
    row = {"id": "r", "cohort": "c", "prompt": "p", "expected": "e", "evaluators": ["llm_judge"], "rubric": "good?"}
    path.write_text(json.dumps({**row, "judge": {"base_url": url, "model": "j"}} if url else row) + "\n")
    return path


def _judge_from_the_environment(tmp_path, monkeypatch, url: str):
    from mergegate.evaluate.evaluators import LlmJudge

    monkeypatch.setenv("MERGEGATE_JUDGE_URL", url)
    monkeypatch.setenv("MERGEGATE_JUDGE_MODEL", "j")
    return LlmJudge().settings(load_suite(_judged_suite(tmp_path, None)).rows[0])


@pytest.mark.parametrize("url", list(BAD_URLS))
def test_every_reader_of_a_url_refuses_it_with_the_same_words(tmp_path, monkeypatch, url):
    why = BAD_URLS[url]
    readers = {
        "check_url": lambda: check_url(url),
        "ModelRef": lambda: ModelRef("m", url=url),
        "rollout plan": lambda: load_plan(_plan_file(tmp_path, url)),
        "models file": lambda: load_models_file(_models_file(tmp_path, url)),
        "suite row's judge": lambda: load_suite(_judged_suite(tmp_path, url)),
        "MERGEGATE_JUDGE_URL": lambda: _judge_from_the_environment(tmp_path, monkeypatch, url),
    }
    if url.startswith("http"):  # only an http(s) text is a url in the NAME=URL spelling (else it is a path)
        readers["NAME=URL"] = lambda: ModelRef.parse(f"m={url}")
    for reader, read in readers.items():
        with pytest.raises((AddressError, ModelRefError, PlanError, SuiteError, EvaluationError)) as refused:
            read()
        message = str(refused.value)
        assert why in message and "\n" not in message, (reader, message)
        assert "hunter2" not in message, (reader, message)  # a refusal never repeats the url's password


def test_good_urls_pass_every_reader(tmp_path):
    for url in ("http://127.0.0.1:8000/v1", "https://api.example.com/v1", "http://[::1]:8000/v1"):
        assert check_url(url) == url and ModelRef("m", url=url).url == url
        assert load_plan(_plan_file(tmp_path, url)).models["m"].url == url
        assert load_models_file(_models_file(tmp_path, url))["m"].url == url


@pytest.mark.parametrize("port", [0, -1, 65536, 65536 + 8080, True, "80"])
def test_a_port_outside_1_to_65535_is_refused_naming_the_option(port):
    with pytest.raises(AddressError, match=rf"^--port {port!r}: a port must be an integer from 1 to 65535$"):
        check_port(port)


def test_a_busy_port_is_refused_at_once_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AddressError, match=rf"^--port {port}: cannot listen on 127.0.0.1:{port}: "):
            bind_port("127.0.0.1", port)
    with bind_port("127.0.0.1", port) as claimed:  # free again once its listener is gone
        assert claimed.getsockname()[1] == port
