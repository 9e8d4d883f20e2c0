"""What a user reads is what runs: every command of README.md, run in order as printed in a checkout laid out like a
user's; the reference's examples are real (the files it shows are the files shipped, its recipes load, its commands
name options that exist and files that are shipped); and no page a user reads cites our own issue tracker."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from mergegate.serving.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DEMO = ROOT / "examples" / "demo"
BIN = Path(sys.executable).parent  # the virtual environment's bin: on PATH, as for a user who activated it
SERVERS = ("serve", "serve-folder")  # commands that keep running: started in the background, stopped at the end
READY_S = 300  # a server that is not healthy by then never will be (loading models on two busy cores: ~40 s)
COMMAND_S = 900  # "returns at all": the slowest README command takes minutes on two busy cores, never this long


def fenced(path: Path) -> list[tuple[str, str]]:
    """The fenced code blocks of a markdown file, in order: (language, body)."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def command_lines(body: str) -> list[str]:
    """A shell block's commands, one per line once continuation lines are joined; comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def argv_of(line: str) -> list[str]:
    return shlex.split(line.rstrip("&").strip(), comments=True)


def mergegate_commands(path: Path) -> list[list[str]]:
    return [argv for language, body in fenced(path) if language in ("bash", "sh")
            for argv in map(argv_of, command_lines(body)) if argv[:1] == ["mergegate"]]


# -- every command of the README, run ------------------------------------------------------------------------------

@dataclass
class UserCheckout:
    """A working folder laid out like a user's checkout (a copy of examples/), where README commands run in order.
    Servers started by the README keep running until `stop`; the ports they print are replaced by free ones (the
    only change made to a command: a fixed port may be taken on a shared machine)."""

    folder: Path
    ports: dict[str, str] = field(default_factory=dict)
    servers: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    @classmethod
    def create(cls, folder: Path) -> UserCheckout:
        shutil.copytree(ROOT / "examples", folder / "examples", ignore=shutil.ignore_patterns("__pycache__"))
        return cls(folder)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def with_ports(self, text: str) -> str:
        for printed, port in self.ports.items():
            text = re.sub(rf"(--port\s+|127\.0\.0\.1:){printed}\b", rf"\g<1>{port}", text)
        return text

    def run_shell(self, line: str) -> None:
        argv = argv_of(line)
        if argv[0] == "mergegate" and argv[1] in SERVERS:
            printed = argv[argv.index("--port") + 1]
            self.ports.setdefault(printed, str(free_port()))
            self.start_server(self.with_ports(line.rstrip("&").strip()))
            return
        done = subprocess.run(["bash", "-c", self.with_ports(line)], cwd=self.folder, env=self.env,
                              capture_output=True, text=True, timeout=COMMAND_S)
        assert done.returncode == 0, f"$ {line}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def start_server(self, line: str) -> None:
        argv = argv_of(line)
        port = argv[argv.index("--port") + 1]
        log_path = self.folder / f"server-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=self.folder, env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append((process, log_path))
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            assert process.poll() is None, f"$ {line}\nexited {process.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)  # polling a server's readiness, not asserting a timing
        pytest.fail(f"$ {line}\nnot healthy within {READY_S} s:\n{log_path.read_text()[-3000:]}")

    def run_python(self, code: str) -> str:
        script = self.folder / "readme_example.py"
        script.write_text(self.with_ports(code))
        done = subprocess.run([sys.executable, str(script)], cwd=self.folder, env=self.env, capture_output=True,
                              text=True, timeout=COMMAND_S)
        assert done.returncode == 0, f"{code}\n{done.stderr[-3000:]}"
        return done.stdout

    def stop(self) -> None:
        for process, _ in self.servers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.servers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def client_example(code: str) -> str:
    """The README's client example, printing who answered and what (it only makes the call as printed)."""
    return (code.replace("client.chat.completions.create(", "answer = client.chat.completions.create(", 1)
            + "\nprint(answer.model)\nprint(answer.choices[0].message.content)\n")


def test_every_readme_shell_line_is_a_mergegate_command_or_one_of_the_two_make_commands():
    """So that running every `mergegate` line below runs every command a README reader is given."""
    lines = [line for language, body in fenced(README) if language in ("bash", "sh") for line in command_lines(body)]
    others = [line for line in lines if argv_of(line)[:1] != ["mergegate"]]
    assert [argv_of(line) for line in others] == [["make", "demo"], ["make", "test"]]
    stages = {argv_of(line)[1] for line in lines if line not in others}
    assert stages == {"release", "methods", "merge", "evaluate", "gate", "serve", "live", "search", "moe",
                      "export-gguf"}


@pytest.mark.slow
def test_every_readme_command_runs_as_printed_in_a_users_checkout(tmp_path):
    """`make demo` and `make test` are left out: the one is `mergegate demo` (tests/demo/test_demo.py), the other
    this suite. Every other line runs in order; the client example runs against the gateway the README starts."""
    checkout = UserCheckout.create(tmp_path)
    client_output = None
    try:
        for language, body in fenced(README):
            if language == "bash":
                for line in command_lines(body):
                    if argv_of(line)[:1] == ["mergegate"]:
                        checkout.run_shell(line)
            elif language == "python" and "OpenAI(" in body:
                client_output = checkout.run_python(client_example(body))
            elif language == "python":
                checkout.run_python(body)
    finally:
        checkout.stop()

    out = checkout.folder
    # the quickstart's release wrote what the README says, and decided what the README says it decided
    for written in ("release/candidate/mergegate.json", "release/report.html", "release/report.md",
                    "release/rollout.yaml", "release/registry.sqlite"):
        assert (out / written).is_file(), written
    plan = yaml.safe_load((out / "release/rollout.yaml").read_text())
    decisions = {cohort: route["decision"] for cohort, route in plan["routes"].items()}
    assert decisions == {"policy_refusal": "promote", "out_of_domain": "promote", "tool_required": "hold",
                         "json_output": "hold", "arithmetic": "reject"}
    assert plan["routes"]["json_output"]["mirror"] == 0.1
    # the client's request was answered by the JSON cohort's model, with the object asked for
    model, content = client_output.strip().splitlines()[-2:]
    assert model == plan["routes"]["json_output"]["model"] == "json_output"
    assert json.loads(content) == {"name": "ada"}
    for written in ("merged/task_arithmetic/mergegate.json", "gate-out/rollout.yaml", "search/best.yaml",
                    "search/search.html", "moe/config.json", "gguf/ties-q8_0.gguf", "traces.jsonl"):
        assert (out / written).is_file(), written


# the docs pages whose `bash` blocks are demo commands, in the order they run (the ensemble gate reads the served
# release's registry); `sh` blocks elsewhere are templates with placeholder paths, checked below without running
DOCS_RUN = ("evaluation.md", "serving.md")


def test_only_the_docs_pages_run_in_order_hold_bash_blocks():
    assert [page.name for page in sorted(DOCS.glob("*.md")) if any(lang == "bash" for lang, _ in fenced(page))] == \
        sorted(DOCS_RUN)


@pytest.mark.slow
def test_the_docs_demo_commands_for_served_models_run_as_printed(tmp_path):
    """The release whose candidate is served (`--serve-candidate`) and the ensemble plan served and gated as a
    candidate, on the demo's suite and policy for served models."""
    checkout = UserCheckout.create(tmp_path)
    try:
        for page in DOCS_RUN:
            for language, body in fenced(DOCS / page):
                for line in command_lines(body) if language == "bash" else []:
                    checkout.run_shell(line)
    finally:
        checkout.stop()
    assert "serve-folder" in (tmp_path / "release-served" / "candidate-server.log").read_text()
    plan = yaml.safe_load((tmp_path / "gate-ensemble" / "rollout.yaml").read_text())
    assert plan["models"]["ensemble"]["upstream_model"] == "mergegate"
    # what docs/serving.md reports of this run
    assert {cohort: route["decision"] for cohort, route in plan["routes"].items()} == \
        {"arithmetic": "promote", "tool_required": "reject", "json_output": "hold", "policy_refusal": "hold"}


# -- the reference's examples are real ------------------------------------------------------------------------------

def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_files_the_readme_and_docs_name_under_examples_are_shipped():
    for page in [README, *doc_pages()]:
        for name in re.findall(r"examples/[\w./+-]*\w", page.read_text()):
            for part in name.split("+"):  # a base+adapter reference names two folders
                assert (ROOT / part).exists() or (ROOT / "examples" / part).exists(), f"{page.name}: {name}"


def test_the_readme_and_docs_link_to_pages_that_exist():
    for page in [README, *doc_pages(), ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_every_documented_mergegate_command_names_options_the_command_has():
    import typer.main

    from mergegate.cli.main import app

    root = typer.main.get_command(app)
    for page in [README, *doc_pages()]:
        for argv in mergegate_commands(page):
            command, rest = root, argv[1:]
            while hasattr(command, "commands") and rest and rest[0] in command.commands:
                command, rest = command.commands[rest[0]], rest[1:]
            assert not hasattr(command, "commands"), f"{page.name}: {shlex.join(argv)}: no such command"
            known = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
            unknown = [token.split("=")[0] for token in rest if token.startswith("--")
                       and token.split("=")[0] not in known]
            assert not unknown, f"{page.name}: {shlex.join(argv)}: unknown option(s) {unknown}"


def shown_file(page: Path, shipped: Path) -> None:
    """The page shows the shipped file whole, as it is."""
    assert ("yaml", shipped.read_text()) in fenced(page), f"{page.name} does not show {shipped} as shipped"


def test_the_docs_show_the_shipped_search_space_ensembles_plan_and_moe_config():
    from mergegate.rollout import load_plan
    from mergegate.search import load_space

    shown_file(DOCS / "search.md", DEMO / "search" / "space.yaml")
    assert load_space(DEMO / "search" / "space.yaml").methods == ["task_arithmetic", "ties", "dare_ties"]
    shown_file(DOCS / "serving.md", DEMO / "ensembles.yaml")
    plan = load_plan(DEMO / "ensembles.yaml")
    assert {cohort: route.strategy.kind for cohort, route in plan.routes.items() if route.strategy} == \
        {"tool_required": "cascade", "json_output": "vote"}
    shown_file(DOCS / "moe.md", DEMO / "moe.yaml")


def test_the_served_suite_is_the_demo_suite_without_its_perplexity_rows_and_its_policy_the_demo_policy_without_them():
    rows = [json.loads(line) for line in (DEMO / "suite.jsonl").read_text().splitlines() if line.strip()]
    served = [json.loads(line) for line in (DEMO / "served" / "suite.jsonl").read_text().splitlines()]
    assert served == [row for row in rows if "perplexity" not in row["evaluators"]]
    left_out = {row["cohort"] for row in rows} - {row["cohort"] for row in served}
    assert left_out == {"out_of_domain"}

    policy = yaml.safe_load((DEMO / "policy.yaml").read_text())
    assert policy.pop("default_route") in left_out
    policy["cohorts"] = {c: rule for c, rule in policy["cohorts"].items() if c not in left_out}
    assert yaml.safe_load((DEMO / "served" / "policy.yaml").read_text()) == policy


def test_the_docs_recipes_are_valid_recipes():
    from mergegate.recipe import load_recipe

    documents = [doc for language, body in fenced(DOCS / "merging.md") if language == "yaml"
                 for doc in yaml.safe_load_all(body) if doc]
    assert len(documents) >= 4
    for recipe in documents:
        assert load_recipe(recipe).merge_method == recipe["merge_method"]


@pytest.mark.slow
def test_the_docs_ties_recipe_merges_as_written(family, tmp_path):
    """The first recipe, with `./base`, `./math` and `./code` being real (tiny) models in the working folder."""
    recipe = next(doc for language, body in fenced(DOCS / "merging.md") if language == "yaml"
                  for doc in yaml.safe_load_all(body)
                  if doc and doc.get("merge_method") == "ties" and doc.get("models", [{}])[0].get("model") == "./math")
    for name, source in (("base", "base"), ("math", "ft1"), ("code", "ft2")):
        shutil.copytree(family[source], tmp_path / name)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run([str(BIN / "mergegate"), "merge", "recipe.yaml", "out", "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "mergegate.json").is_file()


def test_the_docs_models_file_and_chat_row_are_valid(tmp_path):
    from mergegate.evaluate import load_suite
    from mergegate.model_ref import load_models_file

    page = DOCS / "evaluation.md"
    (models_block,) = [body for language, body in fenced(page) if language == "yaml" and "api_key_env: VLLM_KEY" in body]
    models = tmp_path / "models.yaml"
    models.write_text(models_block)
    refs = load_models_file(models)
    assert refs["candidate"].served_model == "merged-ties" and refs["candidate"].endpoint.retries == 3
    assert refs["math"].adapter is not None
    (chat_block,) = [body for language, body in fenced(page) if language == "json" and '"messages"' in body]
    suite = tmp_path / "chat.jsonl"
    suite.write_text(chat_block)
    (row,) = load_suite(suite).rows
    assert row.chat() == [{"role": "user", "content": "json: city=oslo\n"}]


# -- no internal issue references where a user reads ----------------------------------------------------------------

# our tracker's references ("issue 12", "issues 9 and 12", "#12", "the issue's target"); an upstream project's
# ("PEFT #3761") names the project right before it
OUR_ISSUE = r"\bissues?\s*#?\d+|\bthe issue\b"
ISSUE_REF = re.compile(OUR_ISSUE + r"|(?<![\w/&#])#\d+\b", re.IGNORECASE)
UPSTREAM = re.compile(r"(PEFT|mergekit|transformers|vLLM|llama\.cpp|Optuna|Ray|PyTorch) $")


def issue_refs(text: str) -> list[str]:
    return [text[max(0, m.start() - 40):m.end() + 20] for m in ISSUE_REF.finditer(text)
            if not (m.group().startswith("#") and UPSTREAM.search(text[max(0, m.start() - 20):m.start()]))]


def test_the_issue_reference_check_tells_ours_from_an_upstream_projects():
    assert issue_refs("the dev split (issue 12), see #14; The issue's target")
    assert len(issue_refs("a b (issue 12) c #14 d the issue's target")) == 3
    assert issue_refs("PEFT scales by √r (PEFT #3761); #hash anchors, docs/serving.md#ensembles, x=#cohort") == []


def user_pages() -> list[Path]:
    return [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.rglob("*.md")),
            *sorted((ROOT / "examples").rglob("README.md"))]


def test_no_page_a_user_reads_cites_our_issues():
    found = {str(page.relative_to(ROOT)): refs for page in user_pages() if (refs := issue_refs(page.read_text()))}
    assert not found


def test_no_help_text_or_message_cites_our_issues():
    """Every string in the package: help texts, the docstrings typer shows, error messages (a bare `#123` is
    left alone here: in code it is a colour or an anchor)."""
    found = {}
    for source in sorted((ROOT / "src" / "mergegate").rglob("*.py")):
        strings = [node.value for node in ast.walk(ast.parse(source.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        refs = [m.group() for text in strings for m in re.finditer(OUR_ISSUE, text, re.IGNORECASE)]
        if refs:
            found[str(source.relative_to(ROOT))] = refs
    assert not found
