"""The README's code blocks, run as a user would (issue 9: its client example answered 502 on every call)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mergegate.search import load_space

from mergegate.candidate_server import free_port
from mergegate.recipe import load_recipe
from mergegate.rollout import RolloutPlan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO = ROOT / "examples" / "demo"
MERGEGATE = str(Path(sys.executable).with_name("mergegate"))


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def block_with(language: str, marker: str) -> str:
    found = [b for b in blocks(language) if marker in b]
    assert len(found) == 1, f"README has {len(found)} {language} blocks with {marker!r}"
    return found[0]


def demo_plan(path: Path) -> Path:
    """What `make demo` writes for the JSON cohort: held on its specialist, the base behind it, checked online."""
    models = DEMO / "models"
    return RolloutPlan.model_validate({
        "candidate": "json_output",
        "models": {"base": {"role": "base", "path": str(models / "base")},
                   "json_output": {"role": "source", "path": str(models / "json_output")}},
        "routes": {"json_output": {"model": "json_output", "fallback": ["base"], "check": "json_valid"}},
        "default": {"model": "base"},
    }).save(path)


@pytest.fixture
def served_readme_gateway(tmp_path):
    """The README's `mergegate serve` line, with this test's plan, a free port and the suite path made absolute."""
    command = " ".join(block_with("bash", "mergegate serve demo-out/rollout.yaml").replace("\\\n", " ").split())
    port = free_port()
    argv = shlex.split(command.replace('"$TOKEN"', "readme-token"))
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--suite") + 1] = str(ROOT / argv[argv.index("--suite") + 1])
    argv[2] = str(demo_plan(tmp_path / "rollout.yaml"))  # mergegate serve PLAN ...
    assert argv[:2] == ["mergegate", "serve"]
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([MERGEGATE, *argv[1:]], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("the gateway did not become healthy in 180 s")
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.slow
def test_readme_client_example_answers_from_the_json_specialist(served_readme_gateway, tmp_path):
    code = block_with("python", "OpenAI(").replace("127.0.0.1:8080", f"127.0.0.1:{served_readme_gateway}")
    script = tmp_path / "client.py"
    script.write_text(code.replace("client.chat.completions.create(", "answer = client.chat.completions.create(", 1)
                      + "\nprint(answer.model)\nprint(answer.choices[0].message.content)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model, content = done.stdout.strip().splitlines()
    assert model == "json_output"  # answered by the cohort's model, not by the fallback
    assert yaml.safe_load(content) == {"name": "ada"}


def test_readme_recipes_are_valid_recipes():
    documents = [doc for block in blocks("yaml") for doc in yaml.safe_load_all(block) if doc]
    recipes = [doc for doc in documents if isinstance(doc.get("merge_method"), str)]
    assert len(recipes) >= 4
    for recipe in recipes:
        assert load_recipe(recipe).merge_method == recipe["merge_method"]
    # a search space's merge_method may be a choice: the README's space loads as a space
    spaces = [doc for doc in documents if isinstance(doc.get("merge_method"), dict)]
    assert len(spaces) == 1
    assert load_space(spaces[0]).methods == ["task_arithmetic", "ties", "dare_ties"]


@pytest.mark.slow
def test_readme_ties_recipe_merges_as_written(family, tmp_path):
    """The first recipe, with `./base`, `./math` and `./code` being real (tiny) models in the working folder."""
    recipe = next(doc for block in blocks("yaml") for doc in yaml.safe_load_all(block)
                  if doc and doc.get("merge_method") == "ties" and doc.get("models", [{}])[0].get("model") == "./math")
    for name, source in (("base", "base"), ("math", "ft1"), ("code", "ft2")):
        shutil.copytree(family[source], tmp_path / name)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run([MERGEGATE, "merge", "recipe.yaml", "out", "--quiet"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "mergegate.json").is_file()


def test_readme_models_file_and_chat_row_are_valid(tmp_path):
    from mergegate.evaluate import load_suite
    from mergegate.model_ref import load_models_file

    models = tmp_path / "models.yaml"
    models.write_text(block_with("yaml", "api_key_env: VLLM_KEY"))
    refs = load_models_file(models)
    assert refs["candidate"].served_model == "merged-ties" and refs["candidate"].endpoint.retries == 3
    assert refs["math"].adapter is not None
    suite = tmp_path / "chat.jsonl"
    suite.write_text(block_with("json", '"messages"'))
    (row,) = load_suite(suite).rows
    assert row.chat() == [{"role": "user", "content": "json: city=oslo\n"}]
