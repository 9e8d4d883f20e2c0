"""Plain helpers the tests share (fixtures live in conftest.py, which pytest injects by name)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    """Rows as a JSONL suite file (one JSON object a line); returns the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe_for(method: str, family: dict[str, Path], models=("ft1", "ft2", "ft3"), base=True, **parameters) -> dict:
    weights = parameters.pop("weights", [1.0] * len(models))
    recipe = {
        "merge_method": method,
        "models": [{"model": str(family[m]), "parameters": {"weight": w}} for m, w in zip(models, weights)],
    }
    if base:
        recipe["base_model"] = str(family["base"])
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def assert_refused(result, *fragments: str) -> None:
    """A refusal as a user sees it: exit 2, exactly one `mergegate: ...` line on stderr naming each fragment, no
    traceback. `result` is a typer CliRunner result or a finished subprocess."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, (code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + (getattr(result, "output", "") or "")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergegate: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def make_lora(base: Path, out: Path, *, seed: int, rank: int = 4, scale: float = 0.3) -> Path:
    """A PEFT LoRA adapter on `base` whose B matrices are seeded non-zero (so it changes answers), saved with
    save_pretrained to `out`; returns `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return out
