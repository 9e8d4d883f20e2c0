"""The real model through real servers: SmolLM2-135M-Instruct (examples/smollm2/base) evaluated and gated through
vLLM CPU, llama.cpp's llama-server and `transformers serve`, each against in-process evaluation of the same rows.

`make integration` runs these (`pytest -m integration`; `make test` leaves them out). `scripts/setup-servers.sh`
installs vLLM and llama.cpp under .servers/; `transformers serve` comes with transformers. A test whose server or
model is missing skips, saying which and how to get it.

The rows: the first ROWS_PER_COHORT rows of each cohort a server can answer (perplexity rows cannot go through a
completions API), each cut at its own token budget as in process. What is asserted:
- vLLM (float32) and llama.cpp (an f16 GGUF export): every row's answer identical to in process, the budgets from
  the server's own /tokenize, and the same gate decision in every cohort when the base is the served one; vLLM
  also serves a freshly merged candidate for `release` (`--serve-candidate`) with the same decisions;
- llama.cpp q8_0: at least Q8_0_MIN_SCORED_ALIKE of the rows scored as in process (quantization moves near-ties:
  the identical answers and the rows scored alike are printed), and the q8_0 file served under the same alias as
  the f16 one is another model (not the f16 run read back from the cache);
- `transformers serve` (no /tokenize, and no model listed until one is loaded): the run loads the model, every
  row gets max_new_tokens, and each answer is the in-process one wherever that one ended before its own budget
  (its start elsewhere); the gate decides as in process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from mergegate import EvalOptions, ModelRef, Registry, evaluate_models, gate_release, load_suite, release
from mergegate.evaluate.endpoint import EndpointSettings
from mergegate.export import export_gguf
from mergegate.pipeline import ServeCommand
from mergegate.serving.launcher import LOOPBACK, free_port, served_candidate
from mergegate.serving.ready import NotReady, await_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVERS = Path(os.environ.get("SERVERS_DIR", ROOT / ".servers"))
VLLM, LLAMA_SERVER = SERVERS / "bin" / "vllm", SERVERS / "bin" / "llama-server"
TRANSFORMERS = Path(sys.executable).parent / "transformers"
EXAMPLE = ROOT / "examples" / "smollm2"
BASE = EXAMPLE / "base"
RECIPE = EXAMPLE / "recipes" / "task_arithmetic.yaml"
SKILLS = ("arithmetic", "json_output", "tool_required", "policy_refusal")

ROWS_PER_COHORT = 8
MAX_NEW_TOKENS = 48  # above every row's own budget but the longest JSON answers': rows keep the budgets they get
# q8_0 rounds each weight to 1/127 of its block's largest, and llama.cpp rounds the activations it multiplies them
# with to 8 bits too: a long answer often parts from the in-process one at a near-tie (measured on the base in two
# runs: 17 and 20 of 32 answers identical, 32 of 32 scored alike). What the gate reads is the score.
Q8_0_MIN_SCORED_ALIKE = 0.9
START_TIMEOUT_S = 1200  # vLLM compiles its model graph at start: minutes on two busy cores
# generous: a server answers its queue one row after another (transformers serve), and cores are shared
ENDPOINT = EndpointSettings(concurrency=4, timeout_s=900, retries=1)


def _missing(path: Path, what: str, how: str) -> None:
    if not path.exists():
        pytest.skip(f"{what} is not installed ({path} is missing): {how}")


# -- the model, the rows, the policy, and the in-process reference --------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    if not (BASE / "model.safetensors").is_file():
        pytest.skip(f"the real model is missing ({BASE}): make it with `mergegate import-gguf` "
                    "(examples/smollm2/build.py's docstring says how)")
    return tmp_path_factory.mktemp("real-servers")


@pytest.fixture(scope="module")
def suite(work):
    """The first ROWS_PER_COHORT rows of each cohort a server can answer (no perplexity rows)."""
    rows = [json.loads(line) for line in (EXAMPLE / "suite.jsonl").read_text().splitlines() if line.strip()]
    kept: list[dict] = []
    for row in rows:
        if "perplexity" not in row["evaluators"] and sum(r["cohort"] == row["cohort"] for r in kept) < ROWS_PER_COHORT:
            kept.append(row)
    path = work / "suite.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return load_suite(path)


@pytest.fixture(scope="module")
def policy(work, suite) -> Path:
    """The example's policy on these rows: only their cohorts, and min_rows the rows each cohort has."""
    rules = yaml.safe_load((EXAMPLE / "policy.yaml").read_text())
    rules.pop("default_route", None)  # the out-of-domain cohort: perplexity rows, not served
    rules["cohorts"] = {name: rule for name, rule in (rules.get("cohorts") or {}).items() if name in suite.cohorts}
    rules["default"]["min_rows"] = ROWS_PER_COHORT
    path = work / "policy.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def registry(work) -> Registry:
    """One registry for the module: each in-process run is made once and read back by every comparison."""
    return Registry(work / "registry.sqlite")


@pytest.fixture(scope="module")
def options() -> EvalOptions:
    return EvalOptions(max_new_tokens=MAX_NEW_TOKENS, progress=False, threads=1, endpoint=ENDPOINT)


@pytest.fixture(scope="module")
def in_process(suite, registry, options):
    """The base's answers in process, by row id."""
    run = evaluate_models([(ModelRef("base", BASE), "base")], suite, registry, options)["base"]
    return {result.row_id: result for result in run.results}


@pytest.fixture(scope="module")
def lineup(work):
    """The gate's candidate (the example's task-arithmetic merge, made here) and sources (the base with each
    specialist's adapter), all in process; skipped while the example's adapters are not trained."""
    missing = [skill for skill in SKILLS if not (EXAMPLE / "adapters" / skill / "adapter_config.json").is_file()]
    if missing:
        pytest.skip(f"the example's adapters are not trained ({', '.join(missing)} missing under "
                    f"{EXAMPLE / 'adapters'}): run examples/smollm2/build.py")
    from mergegate import merge

    merge(RECIPE, work / "merged", progress=False)
    candidate = ModelRef("candidate", work / "merged")
    sources = [ModelRef(skill, BASE, adapter=EXAMPLE / "adapters" / skill) for skill in SKILLS]
    return candidate, sources


@pytest.fixture(scope="module")
def reference_gate(work, lineup, suite, policy, registry, options):
    candidate, sources = lineup
    return gate_release(candidate, ModelRef("base", BASE), sources, suite, policy, work / "gate-in-process",
                        eval=options, registry=registry).gate


def decisions(gate) -> dict[str, tuple[str, str]]:
    return {d.cohort: (d.decision, d.model) for d in gate.decisions}


def served_run(ref: ModelRef, suite, registry, options):
    run = evaluate_models([(ref, "base")], suite, registry, options)[ref.name]
    return run, {result.row_id: result for result in run.results}


def same_answers(served: dict, reference: dict) -> list[str]:
    """The rows whose answer differs from the in-process one."""
    return [row_id for row_id, result in reference.items() if served[row_id].output != result.output]


def budget_used(registry: Registry, run) -> str:
    return registry.run_config(run.run_id)["generation"]["budget"]


def report(server: str, what: str) -> None:
    print(f"\n[{server}] {what}")


def agreement(served: dict, reference: dict) -> str:
    return f"{len(reference) - len(same_answers(served, reference))}/{len(reference)} answers identical to in-process"


def gate_line(gate) -> str:
    return "gate as in process: " + ", ".join(f"{cohort} {decision}" for cohort, (decision, _) in decisions(gate).items())


# -- vLLM CPU ----------------------------------------------------------------------------------------------------

VLLM_TEMPLATE = (f"{VLLM} serve {{path}} --served-model-name {{name}} --host {LOOPBACK} --port {{port}} "
                 "--dtype float32 --max-model-len 2048")


class TestVLLM:
    @pytest.fixture(scope="class")
    def vllm(self):
        _missing(VLLM, "vLLM CPU", "scripts/setup-servers.sh vllm")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the model needs little, and the machine is shared
            yield

    @pytest.fixture(scope="class")
    def vllm_base(self, vllm, work):
        """The base behind vLLM CPU (float32) as a url model named `base`; stopped after the class."""
        with served_candidate(VLLM_TEMPLATE, BASE.resolve(), "base", work / "vllm-base.log",
                              timeout_s=START_TIMEOUT_S) as url:
            yield ModelRef("base", url=url)

    def test_answers_every_row_as_in_process(self, vllm_base, suite, registry, options, in_process):
        run, served = served_run(vllm_base, suite, registry, options)
        assert budget_used(registry, run) == "tokenize"
        assert same_answers(served, in_process) == []
        report("vLLM CPU, float32", agreement(served, in_process))

    def test_the_served_base_gates_as_in_process(self, vllm_base, lineup, work, suite, policy, registry, options,
                                                 reference_gate):
        candidate, sources = lineup
        gate = gate_release(candidate, vllm_base, sources, suite, policy, work / "gate-vllm", eval=options,
                            registry=registry).gate
        assert decisions(gate) == decisions(reference_gate)
        report("vLLM CPU, float32, the base served", gate_line(gate))

    def test_serves_a_merged_candidate_for_release(self, vllm, lineup, work, suite, policy, registry, options):
        in_process_release = release(RECIPE, suite, policy, work / "release-in-process", eval=options,
                                     registry=registry)
        served = release(RECIPE, suite, policy, work / "release-vllm", eval=options, registry=registry,
                         serve=ServeCommand(VLLM_TEMPLATE, timeout_s=START_TIMEOUT_S))
        name = served.candidate.name
        assert served.runs[name].ref.url is not None  # evaluated through its server
        reference = {r.row_id: r for r in in_process_release.runs[name].results}
        answers = {r.row_id: r for r in served.runs[name].results}
        assert same_answers(answers, reference) == []
        assert decisions(served.gate) == decisions(in_process_release.gate)
        report("vLLM CPU, float32, the merged candidate served (release)",
               f"{agreement(answers, reference)}; {gate_line(served.gate)}")


# -- llama.cpp's llama-server ----------------------------------------------------------------------------------

# --no-repack: on CPUs with AMX the q8_0/q4_0 weight repacking crashes (SIGILL); the alias names the model
LLAMA_TEMPLATE = (f"{LLAMA_SERVER} -m {{path}} --alias {{name}} --no-repack --host {LOOPBACK} --port {{port}} "
                  "--ctx-size 4096 --threads 2")


@contextmanager
def llama_server(gguf: Path, log: Path):
    with served_candidate(LLAMA_TEMPLATE, gguf, "base", log, timeout_s=START_TIMEOUT_S) as url:
        yield ModelRef("base", url=url)


class TestLlamaCpp:
    @pytest.fixture(scope="class")
    def gguf_files(self, work) -> dict[str, Path]:
        _missing(LLAMA_SERVER, "llama.cpp's llama-server", "scripts/setup-servers.sh llama")
        files = {qtype: work / f"base-{qtype}.gguf" for qtype in ("f16", "q8_0")}
        for qtype, path in files.items():
            export_gguf(BASE, path, qtype)
        return files

    @pytest.fixture(scope="class")
    def llama_f16(self, work, gguf_files):
        with llama_server(gguf_files["f16"], work / "llama-f16.log") as ref:
            yield ref

    def test_f16_answers_every_row_as_in_process(self, llama_f16, suite, registry, options, in_process):
        run, served = served_run(llama_f16, suite, registry, options)
        assert budget_used(registry, run) == "tokenize"  # llama.cpp's /tokenize, asked in its own dialect
        assert same_answers(served, in_process) == []
        assert all(result.server_ms is not None and result.server_ms > 0 for result in served.values())
        report("llama.cpp, f16 GGUF", agreement(served, in_process))

    def test_the_served_f16_base_gates_as_in_process(self, llama_f16, lineup, work, suite, policy, registry,
                                                     options, reference_gate):
        candidate, sources = lineup
        gate = gate_release(candidate, llama_f16, sources, suite, policy, work / "gate-llama-f16", eval=options,
                            registry=registry).gate
        assert decisions(gate) == decisions(reference_gate)
        report("llama.cpp, f16 GGUF, the base served", gate_line(gate))

    def test_q8_0_scores_within_its_rounding_and_is_not_read_back_as_the_f16_run(
            self, llama_f16, gguf_files, work, suite, registry, options, in_process):
        f16_run, _ = served_run(llama_f16, suite, registry, options)
        with llama_server(gguf_files["q8_0"], work / "llama-q8_0.log") as q8_0:  # the same alias, other weights
            run, served = served_run(q8_0, suite, registry, options)
        assert not run.cached and run.model_hash != f16_run.model_hash
        scored_otherwise = [row_id for row_id, result in in_process.items() if served[row_id].score != result.score]
        scored_alike = len(in_process) - len(scored_otherwise)
        report("llama.cpp, q8_0 GGUF", f"{agreement(served, in_process)}; {scored_alike}/{len(in_process)} scored "
                                       f"alike (bound {Q8_0_MIN_SCORED_ALIKE:.0%}): "
                                       f"otherwise {', '.join(scored_otherwise) or 'none'}")
        assert scored_alike / len(in_process) >= Q8_0_MIN_SCORED_ALIKE


# -- transformers serve -----------------------------------------------------------------------------------------


@contextmanager
def _process_group(argv: list[str], log_path: Path):
    """`argv` in its own session, its output in `log_path`; the whole group ended when the block ends."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            yield process
        finally:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, signum)
                    process.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            process.wait()


def own_budget(row, tokenizer) -> int:
    """The row's budget in process (evaluate.local): min(max_new_tokens, 2 * tokens of `expected` + 8)."""
    return min(MAX_NEW_TOKENS, 2 * len(tokenizer(row.expected, add_special_tokens=False)["input_ids"]) + 8)


class TestTransformersServe:
    @pytest.fixture(scope="class")
    def transformers_base(self, work):
        """`transformers serve` with no model named: it lists none until a request loads one (the evaluation
        asks for it once), as a url model named `base`; stopped after the class."""
        _missing(TRANSFORMERS, "`transformers serve`", "pip install 'transformers[serving]'")
        if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
            pytest.skip("`transformers serve` needs FastAPI and uvicorn: pip install 'mergegate[serve]'")
        import httpx

        port = free_port()
        url = f"http://{LOOPBACK}:{port}/v1"
        log = work / "transformers-serve.log"
        argv = [str(TRANSFORMERS), "serve", "--host", LOOPBACK, "--port", str(port), "--device", "cpu",
                "--dtype", "float32"]
        with _process_group(argv, log) as process:

            def answers() -> bool:
                try:
                    return httpx.get(f"{url}/models", timeout=5, trust_env=False).status_code == 200
                except httpx.HTTPError:
                    return False

            try:
                await_ready(answers, START_TIMEOUT_S,
                            gone=lambda: None if process.poll() is None else f"exited with {process.returncode}")
            except NotReady as exc:
                pytest.fail(f"transformers serve did not get ready ({exc}); see {log}")
            yield ModelRef("base", url=url, served_model=str(BASE.resolve()))

    def test_loads_the_model_and_answers_as_in_process(self, transformers_base, suite, registry, options,
                                                       in_process):
        from transformers import AutoTokenizer

        run, served = served_run(transformers_base, suite, registry, options)
        assert budget_used(registry, run) == "max_new_tokens"  # it has no /tokenize
        tokenizer = AutoTokenizer.from_pretrained(BASE)
        cut = {row.id for row in suite.rows if in_process[row.id].completion_tokens >= own_budget(row, tokenizer)}
        assert [row_id for row_id in in_process if row_id not in cut
                and served[row_id].output != in_process[row_id].output] == []
        assert [row_id for row_id in cut if not served[row_id].output.startswith(in_process[row_id].output)] == []
        report("transformers serve, float32", f"{agreement(served, in_process)}; {len(cut)} in-process answers "
                                              "were cut at their own budget, and the served ones begin with them")

    def test_the_served_base_gates_as_in_process(self, transformers_base, lineup, work, suite, policy, registry,
                                                 options, reference_gate):
        candidate, sources = lineup
        gate = gate_release(candidate, transformers_base, sources, suite, policy, work / "gate-transformers",
                            eval=options, registry=registry).gate
        assert decisions(gate) == decisions(reference_gate)
        report("transformers serve, float32, the base served", gate_line(gate))
