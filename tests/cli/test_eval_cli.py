"""`mergegate evaluate` and `mergegate gate` on bad inputs (exit 2, one line, no traceback) and on repeated runs
(byte-identical decisions and reports, whether results come from the models or from the registry)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergegate.cli.main import app

from ..helpers import assert_refused, recipe_for, write_jsonl

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
MERGEGATE = str(Path(sys.executable).with_name("mergegate"))
ROWS = [{"id": f"r{i}", "cohort": "echo" if i % 2 else "json_output", "prompt": f"say {i}:", "expected": str(i),
         "evaluators": ["exact_match"] if i % 2 else ["json_valid"]} for i in range(4)]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])





@pytest.fixture
def suite_file(tmp_path):
    return write_jsonl(tmp_path / "suite.jsonl", ROWS)


@pytest.fixture
def gate_args(family, suite_file, tmp_path):
    def args(policy: str | None = None, suite: Path | None = None):
        extra = []
        if policy is not None:
            (tmp_path / "policy.yaml").write_text(policy)
            extra = ["--policy", tmp_path / "policy.yaml"]
        return ["gate", "--candidate", f"cand={family['ft1']}", "--base", f"base={family['base']}", "--source",
                f"src={family['ft2']}", "--suite", suite or suite_file, "--out", tmp_path / "out",
                "--registry", tmp_path / "registry.sqlite", *extra]

    return args


@pytest.mark.parametrize("policy, fragments", [
    ("default: {max_drop: [0.1\n", ["policy.yaml: line 2, column 1: not valid YAML"]),
    ("!!python/object/apply:os.system ['echo pwned']\n", ["line 1, column 1", "python/object/apply:os.system"]),
    ("- 0.95\n", ["expected a mapping of policy fields", "got list"]),
    ("default: {max_dorp: 0.1}\n", ["default.max_dorp: Extra inputs are not permitted"]),
    ("default: {max_drop: high}\n", ["default.max_drop: Input should be a valid number"]),
    ("bootstrap: 1e9\n", ["bootstrap: Input should be a valid integer"]),
    ("bootstrap: 1000000000\n", ["bootstrap: Input should be less than or equal to 100000"]),
    ("cohorts: {json_ouput: {max_drop: 0.01}}\n", ["'json_ouput' not in the suite", "cohorts: json_output, echo"]),
])
def test_gate_refuses_a_bad_policy_in_one_line(gate_args, tmp_path, policy, fragments):
    assert_refused(_invoke(*gate_args(policy)), *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "registry.sqlite").exists()


def test_gate_refuses_a_bad_suite_in_one_line(gate_args, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + json.dumps(ROWS[1]).encode()[:-2] + b'\xff"}\n')
    assert_refused(_invoke(*gate_args(suite=bad)), "bad.jsonl: line 2: not valid UTF-8 (byte 0xff")
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(json.dumps(r) for r in [*ROWS, ROWS[1]]))
    assert_refused(_invoke(*gate_args(suite=dup)), "dup.jsonl: line 5: duplicate id 'r1' (first used on line 2)")


@pytest.mark.parametrize("options, fragments", [
    (["--batch-size", "0"], ["batch size must be an integer >= 1, got 0"]),
    (["--batch-size", "-3"], ["batch size must be an integer >= 1, got -3"]),
    (["--max-new-tokens", "0"], ["max new tokens must be an integer >= 1, got 0"]),
])
def test_evaluate_refuses_bad_settings_and_records_nothing(family, suite_file, tmp_path, options, fragments):
    result = _invoke("evaluate", f"base={family['base']}", "--suite", suite_file, "--registry",
                     tmp_path / "registry.sqlite", *options)
    assert_refused(result, *fragments)
    assert not (tmp_path / "registry.sqlite").exists()


@pytest.mark.parametrize("options, fragments", [
    (["--batch-size", "0"], ["batch size must be an integer >= 1, got 0"]),
    (["--max-new-tokens", "0"], ["max new tokens must be an integer >= 1, got 0"]),
])
def test_gate_refuses_bad_settings_and_records_nothing(gate_args, tmp_path, options, fragments):
    assert_refused(_invoke(*gate_args(), *options), *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "registry.sqlite").exists()


def test_gate_passes_its_generation_settings_through(gate_args, tmp_path):
    result = _invoke(*gate_args(), "--batch-size", "3", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    configs = sqlite3.connect(tmp_path / "registry.sqlite").execute("SELECT config FROM eval_runs").fetchall()
    assert len(configs) == 3 and all(json.loads(c)["generation"]["max_new_tokens"] == 2 for (c,) in configs)


def test_release_passes_registry_and_generation_settings_through(family, suite_file, tmp_path, write_recipe):
    recipe = write_recipe(recipe_for("task_arithmetic", family, models=("ft1", "ft2")))
    assert_refused(_invoke("release", recipe, "--suite", suite_file, "--out", tmp_path / "refused", "--batch-size", "0"),
             "batch size must be an integer >= 1, got 0")
    assert not (tmp_path / "refused").exists()
    result = _invoke("release", recipe, "--suite", suite_file, "--out", tmp_path / "out", "--registry",
                     tmp_path / "shared.sqlite", "--batch-size", "2", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "registry.sqlite").exists()
    configs = sqlite3.connect(tmp_path / "shared.sqlite").execute("SELECT config FROM eval_runs").fetchall()
    assert len(configs) == 4 and all(json.loads(c)["generation"]["max_new_tokens"] == 2 for (c,) in configs)


def test_evaluate_refuses_a_missing_model(suite_file, tmp_path):
    assert_refused(_invoke("evaluate", f"ghost={tmp_path / 'nowhere'}", "--suite", suite_file, "--registry",
                     tmp_path / "registry.sqlite"), "model 'ghost':", "nowhere: no such folder")


@pytest.mark.parametrize("kind", ["folder", "not sqlite"])
def test_evaluate_refuses_an_unopenable_registry(family, suite_file, tmp_path, kind):
    registry = tmp_path / "registry.sqlite"
    if kind == "folder":
        registry.mkdir()
    else:
        registry.write_bytes(b"PK\x03\x04" + b"\x00" * 4096)
    assert_refused(_invoke("evaluate", f"base={family['base']}", "--suite", suite_file, "--registry", registry),
             f"registry {registry}")


def test_evaluate_refuses_invalid_utf8_and_accepts_a_bom(family, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join([json.dumps(ROWS[0]).encode(), b'{"id": "caf\xe9"}']))
    assert_refused(_invoke("evaluate", f"base={family['base']}", "--suite", bad, "--registry", tmp_path / "r.sqlite"),
             "bad.jsonl: line 2: not valid UTF-8 (byte 0xe9 at column 12)")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in ROWS).encode())
    result = _invoke("evaluate", f"base={family['base']}", "--suite", bom, "--registry", tmp_path / "r.sqlite",
                     "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "json_output" in result.stdout and "echo" in result.stdout


@pytest.mark.slow
def test_the_real_executable_refuses_a_python_tag_without_a_traceback(gate_args, tmp_path):
    args = gate_args("!!python/object/apply:os.system ['touch pwned']\n")
    done = subprocess.run([MERGEGATE, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("mergegate: policy ")
    assert not (tmp_path / "pwned").exists()


# --- the same gate twice: byte-identical (issue 11) -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "models" / "base" / "config.json").is_file(), reason="demo models not built")
def test_the_same_gate_twice_gives_byte_identical_decisions_and_reports(tmp_path):
    rows = [json.loads(line) for line in (DEMO / "suite.jsonl").read_text().splitlines()]
    picked = [r for r in rows if r["cohort"] == "json_output"][:20] + [r for r in rows if r["cohort"] == "tool_required"][:20]
    suite = tmp_path / "suite.jsonl"
    suite.write_text("\n".join(json.dumps(r) for r in picked) + "\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: {min_score: 0.3, max_drop: 0.1, min_retention: 0.85}\n")
    models = DEMO / "models"
    outputs = []
    for out in ("first", "second"):
        result = _invoke("gate", "--candidate", f"cand={models / 'json_output'}", "--base", f"base={models / 'base'}",
                         "--source", f"tool={models / 'tool_required'}", "--suite", suite, "--out", tmp_path / out,
                         "--registry", tmp_path / "registry.sqlite", "--policy", policy)
        assert result.exit_code == 0, result.output
        outputs.append({name: (tmp_path / out / name).read_bytes()
                        for name in ("report.md", "report.html", "rollout.yaml", "chart.png")})
    assert outputs[0] == outputs[1]
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    runs = db.execute("SELECT count(*) FROM eval_runs").fetchone()[0]
    decisions = db.execute("SELECT candidate_hash, cohort, decision, model, numbers FROM decisions ORDER BY id").fetchall()
    assert runs == 3  # the second gate read every model from the registry
    assert decisions[:2] == decisions[2:]


# --- endpoint settings on the CLI (issue 11) ------------------------------------------------------------------


@pytest.mark.parametrize("options, fragments", [
    (["--endpoint-concurrency", "0"], ["endpoint concurrency must be an integer >= 1, got 0"]),
    (["--endpoint-timeout", "0"], ["endpoint timeout must be in (0, 3600] seconds, got 0.0"]),
    (["--endpoint-timeout", "nan"], ["endpoint timeout is NaN, not a number of seconds"]),
    (["--endpoint-timeout", "inf"], ["endpoint timeout must be in (0, 3600] seconds, got inf"]),
    (["--endpoint-retries", "-1"], ["endpoint retries must be an integer in [0, 20], got -1"]),
    (["--api-key-env", "MERGEGATE_TEST_UNSET_KEY"], ["API key variable MERGEGATE_TEST_UNSET_KEY is not set"]),
])
@pytest.mark.parametrize("command", ["evaluate", "gate", "release"])
def test_bad_endpoint_settings_are_refused_before_anything_is_written(family, suite_file, tmp_path, write_recipe,
                                                                      monkeypatch, command, options, fragments):
    monkeypatch.delenv("MERGEGATE_TEST_UNSET_KEY", raising=False)
    registry, out = tmp_path / "registry.sqlite", tmp_path / "out"
    if command == "evaluate":
        args = ["evaluate", "m=http://127.0.0.1:9/v1#m", "--suite", suite_file, "--registry", registry]
    elif command == "gate":
        args = ["gate", "--candidate", "cand=http://127.0.0.1:9/v1#cand", "--base", f"base={family['base']}",
                "--source", f"src={family['ft2']}", "--suite", suite_file, "--out", out, "--registry", registry]
    else:
        recipe = write_recipe(recipe_for("task_arithmetic", family, models=("ft1", "ft2")))
        args = ["release", recipe, "--suite", suite_file, "--out", out, "--registry", registry]
    assert_refused(_invoke(*args, *options), *fragments)
    assert not out.exists() and not registry.exists()


@pytest.mark.slow
def test_endpoint_settings_reach_the_url_model(tmp_path, monkeypatch):
    from mergegate.gateway.testing import ServerThread

    from ..evaluate.helpers import Scripted

    server = Scripted()
    seen_keys: list[str | None] = []

    @server.app.middleware("http")
    async def record_key(request, call_next):
        seen_keys.append(request.headers.get("authorization"))
        return await call_next(request)

    suite = tmp_path / "tiny.jsonl"
    suite.write_text(json.dumps({"id": "a", "cohort": "c", "prompt": "6*7=", "expected": "42",
                                 "evaluators": ["exact_match"]}) + "\n")
    monkeypatch.setenv("MERGEGATE_TEST_KEY", "sekrit")
    with ServerThread(server.app) as running:
        args = ["evaluate", f"m={running.url}/v1#m", "--suite", suite, "--registry", tmp_path / "r.sqlite",
                "--endpoint-concurrency", "1", "--endpoint-timeout", "5", "--api-key-env", "MERGEGATE_TEST_KEY"]
        server.busy = 1
        assert_refused(_invoke(*args, "--endpoint-retries", "0"), "model 'm'", "failed after 1 try", "HTTP 429")
        server.busy = 1
        result = _invoke(*args, "--endpoint-retries", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "1.000" in result.stdout
    assert seen_keys and set(seen_keys) == {"Bearer sekrit"}


# --- release --serve-candidate (issue 11) ---------------------------------------------------------------------


def _served_demo_suite(tmp_path) -> Path:
    """The first 2 rows per cohort of the demo suite, the perplexity cohort left out (a server gives no
    likelihood)."""
    rows, seen = [], {}
    for line in (DEMO / "suite.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "perplexity" not in row["evaluators"] and seen.get(row["cohort"], 0) < 2:
            seen[row["cohort"]] = seen.get(row["cohort"], 0) + 1
            rows.append(row)
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _no_process_serves(folder: Path) -> bool:
    import os

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "serve-folder" in cmdline and str(folder) in cmdline:
            return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "models" / "base" / "config.json").is_file(), reason="demo models not built")
def test_release_serves_the_candidate_and_plans_its_folder(tmp_path):
    out = tmp_path / "out"
    template = f"{MERGEGATE} serve-folder {{path}} --port {{port}} --served-model-name {{name}} --device cpu"
    result = _invoke("release", DEMO / "recipes" / "ties.yaml", "--suite", _served_demo_suite(tmp_path), "--out", out,
                     "--max-new-tokens", "8", "--device", "cpu", "--serve-candidate", template, "--serve-timeout", "180")
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "report.md").is_file() and (out / "candidate-server.log").is_file()
    plan = yaml.safe_load((out / "rollout.yaml").read_text())
    entry = plan["models"]["merged-ties"]
    assert entry.get("url") is None and Path(out / "rollout.yaml").parent.joinpath(entry["path"]).resolve() \
        == (out / "candidate").resolve()
    db = sqlite3.connect(out / "registry.sqlite")
    assert any(path.startswith("http://127.0.0.1:") for (path,) in db.execute("SELECT path FROM models"))
    assert _no_process_serves(out / "candidate")


def test_release_refuses_a_candidate_server_that_exits_at_once(tmp_path):
    out = tmp_path / "out"
    result = _invoke("release", DEMO / "recipes" / "ties.yaml", "--suite", _served_demo_suite(tmp_path), "--out", out,
                     "--device", "cpu", "--serve-candidate", "false {path} {port} {name}")
    assert_refused(result, "exited with code 1 before it was ready", str(out / "candidate-server.log"))
    assert (out / "candidate-server.log").is_file()


def test_release_refuses_a_bad_template_before_merging(tmp_path):
    out = tmp_path / "out"
    assert_refused(_invoke("release", DEMO / "recipes" / "ties.yaml", "--suite", _served_demo_suite(tmp_path), "--out",
                     out, "--serve-candidate", "vllm serve {path} --port {prot}"), "{path}, {port} and {name}")
    assert not out.exists()


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["down", "wrong name", "no /v1"])
def test_a_failed_evaluation_against_an_endpoint_leaves_no_registry(family, suite_file, tmp_path, where):
    from mergegate.gateway.testing import ServerThread
    from tests.evaluate.helpers import Scripted

    with ServerThread(Scripted().app) as running:
        url = {"down": f"http://127.0.0.1:{_closed_port()}/v1", "wrong name": running.url + "/v1#other",
               "no /v1": running.url}[where]
        evaluated = _invoke("evaluate", f"m={url}", "--suite", suite_file, "--registry",
                            tmp_path / "new" / "registry.sqlite", "--endpoint-retries", "0")
        gated = _invoke("gate", "--candidate", f"m={url}", "--base", f"base={family['base']}", "--source",
                        f"src={family['ft1']}", "--suite", suite_file, "--out", tmp_path / "out", "--registry",
                        tmp_path / "gate" / "registry.sqlite", "--endpoint-retries", "0")
    assert_refused(evaluated, "model 'm'")
    assert_refused(gated, "model 'm'")
    assert not (tmp_path / "new").exists() and not (tmp_path / "gate").exists() and not (tmp_path / "out").exists()


def test_a_failed_evaluation_keeps_a_registry_that_was_there(suite_file, tmp_path):
    from mergegate.registry import Registry

    Registry(tmp_path / "registry.sqlite").close()
    result = _invoke("evaluate", f"m=http://127.0.0.1:{_closed_port()}/v1", "--suite", suite_file, "--registry",
                     tmp_path / "registry.sqlite", "--endpoint-retries", "0")
    assert_refused(result, "model 'm'")
    assert (tmp_path / "registry.sqlite").is_file()


def test_refusals_read_as_sentences_without_pydantics_prefixes(tmp_path):
    suite = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "cohort": "c", "prompt": "p", "expected": "e",
                                                "messages": [{"role": "user", "content": "x"}],
                                                "evaluators": ["exact_match"]}])
    row = _invoke("evaluate", "m=http://127.0.0.1:9/v1", "--suite", suite, "--registry", tmp_path / "r.sqlite")
    assert_refused(row, "line 1: row: a row needs exactly one of 'prompt' (text) or 'messages' (a chat)")
    (tmp_path / "plan.yaml").write_text("candidate: a\nmodels: {a: {role: candidate, path: ., api_key_env: K}}\n"
                                        "routes: {}\ndefault: {model: a}\n")
    from mergegate.errors import PlanError
    from mergegate.rollout import load_plan

    with pytest.raises(PlanError) as plan:
        load_plan(tmp_path / "plan.yaml")
    assert str(plan.value).endswith("models.a: 'api_key_env' applies to a 'url', not to a local 'path'")
    assert "Value error" not in row.output


def test_a_nan_timeout_is_refused_as_not_a_number(suite_file, tmp_path):
    (tmp_path / "models.yaml").write_text("models:\n  up: {base_url: 'http://127.0.0.1:9/v1', timeout_s: .nan}\n")
    from_file = _invoke("evaluate", "--models", tmp_path / "models.yaml", "--suite", suite_file, "--registry",
                        tmp_path / "r.sqlite")
    assert_refused(from_file, "models.up: timeout_s: NaN is not a number")  # the option: bad endpoint settings
    assert not (tmp_path / "r.sqlite").exists()
