"""A miniature run of docs/experiments/minilm_retention.py: two tasks, a few training steps, two methods.

Keeps the experiment script honest: the generated tasks are balanced and their test splits are unseen
sentences from held-out vocabulary; the merged encoders it scores are exactly what the recipes say
(checked against weights recomputed here); retention is merged / individual accuracy; the outputs exist;
and a rerun reuses the cached fine-tunes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "minilm_retention.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("minilm_retention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


exp = _load_script()


def _miniature(out: Path, **overrides) -> "exp.Config":
    settings = dict(out=out, tasks=("sentiment", "tense", "intent"), methods=("linear", "slerp", "task_arithmetic"),
                    n_train=48,
                    n_test=32, train=exp.TrainSettings(steps=4, batch_size=8, max_length=16), keep_merges=True,
                    quiet=True)
    settings.update(overrides)
    return exp.Config(**settings)


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    return out, exp.run(_miniature(out))


@pytest.mark.parametrize("name", list(exp.TASK_BUILDERS))
def test_tasks_are_balanced_seeded_and_test_sentences_are_unseen(name):
    task = exp.TASK_BUILDERS[name](0, 120, 60)
    again = exp.TASK_BUILDERS[name](0, 120, 60)
    other_seed = exp.TASK_BUILDERS[name](1, 120, 60)
    assert task == again, "same seed must give the same data"
    assert task.train != other_seed.train
    for split in (task.train, task.test):
        counts = [sum(1 for _, y in split if y == label) for label in range(len(task.labels))]
        assert max(counts) - min(counts) <= 1, f"{name}: unbalanced labels {counts}"
    train_texts = {text for text, _ in task.train}
    assert len(train_texts) == len(task.train), f"{name}: duplicate training sentences"
    assert not train_texts & {text for text, _ in task.test}, f"{name}: a test sentence is also in train"


def test_sentiment_test_split_uses_held_out_words_and_templates():
    task = exp.sentiment_task(0, 400, 200)
    train_words = {w for text, _ in task.train for w in text.split()}
    test_only = {w for text, _ in task.test for w in text.split()} - train_words
    # The adjectives, nouns and template words of the test split never occur in training.
    assert {"opinion", "turned", "anything"} <= test_only, sorted(test_only)
    assert len(test_only) >= 15, sorted(test_only)
    # Negation flips the label: every plain/negated template pair is used in both classes.
    negated = [y for text, y in task.train if " not " in f" {text} " or "never" in text or "far from" in text]
    assert 0.3 < sum(negated) / len(negated) < 0.7


def test_plan_gives_two_model_methods_the_first_two_fine_tunes(tmp_path):
    finetunes = {name: tmp_path / name for name in ("a", "b", "c")}
    slerp = exp.plan_method("slerp", tmp_path / "base", finetunes)
    assert slerp.tasks == ["a", "b"]
    assert slerp.recipe["base_model"] == str(finetunes["a"])
    assert [m["model"] for m in slerp.recipe["models"]] == [str(finetunes["b"])]
    assert slerp.recipe["parameters"] == {"t": 0.5}

    linear = exp.plan_method("linear", tmp_path / "base", finetunes)
    assert "base_model" not in linear.recipe, "linear ignores the base, so it averages the fine-tunes only"
    assert [m["parameters"] for m in linear.recipe["models"]] == [{"weight": 1.0}] * 3
    ties = exp.plan_method("ties", tmp_path / "base", finetunes)
    assert ties.recipe["base_model"] == str(tmp_path / "base") and ties.tasks == ["a", "b", "c"]
    assert ties.recipe["models"][0]["parameters"] == {"weight": 1.0, "density": 0.2}


def test_every_registered_method_gets_a_valid_recipe_or_a_reason(tmp_path):
    import mergegate
    from mergegate.recipe import load_recipe

    finetunes = {name: tmp_path / name for name in ("a", "b", "c")}
    for name in mergegate.available_methods():
        plan = exp.plan_method(name, tmp_path / "base", finetunes)
        if plan.skipped:
            assert plan.recipe is None and plan.skipped
            continue
        load_recipe(plan.recipe)  # raises RecipeError on an unknown or out-of-range parameter


def test_regmean_gets_each_fine_tune_its_own_task_text_and_fisher_a_reason(tmp_path):
    from mergegate.recipe import load_recipe

    finetunes = {name: tmp_path / name for name in ("a", "b", "c")}
    calibration = {name: tmp_path / f"calibration-{name}.jsonl" for name in finetunes}
    regmean = exp.plan_method("regmean", tmp_path / "base", finetunes, calibration)
    assert [m["calibration"] for m in regmean.recipe["models"]] == [str(calibration[n]) for n in ("a", "b", "c")]
    assert [m["model"] for m in regmean.recipe["models"]] == [str(finetunes[n]) for n in ("a", "b", "c")]
    load_recipe(regmean.recipe)
    assert "causal LM" in exp.plan_method("fisher", tmp_path / "base", finetunes, calibration).skipped
    assert exp.plan_method("regmean", tmp_path / "base", finetunes).skipped  # no text: a reason, not a recipe


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two flattened tensors, linear when they are (nearly) parallel."""
    dot = float((a / a.norm()).flatten() @ (b / b.norm()).flatten())
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = torch.tensor(dot).clamp(-1, 1).acos()
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


@pytest.mark.slow
def test_merged_encoders_are_what_the_recipes_say(miniature):
    out, results = miniature
    folders = {"base": "encoders/pretrained", "linear": "merges/linear", "slerp": "merges/slerp",
               "task_arithmetic": "merges/task_arithmetic", "linear2": "merges/linear-sentiment-tense",
               **{t: f"encoders/{t}" for t in ("sentiment", "tense", "intent")}}
    read = {name: load_file(str(out / folder / "model.safetensors")) for name, folder in folders.items()}
    worst = dict.fromkeys(("linear", "task_arithmetic", "linear2", "slerp"), 0.0)
    moved = 0
    for key, base in read["base"].items():
        a, b, c = read["sentiment"][key], read["tense"][key], read["intent"][key]
        moved += int(not torch.equal(a, base))
        expected = {
            "linear": (a + b + c) / 3,
            "task_arithmetic": base + 0.5 * ((a - base) + (b - base) + (c - base)),  # lambda 0.5, weights 1
            "linear2": (a + b) / 2,  # the reference merge on the two tasks slerp covers
            "slerp": _slerp(0.5, a, b),  # base_model slot = the first fine-tune, t = 0.5
        }
        for name, value in expected.items():
            worst[name] = max(worst[name], float((read[name][key] - value).abs().max()))
    assert moved > 50, f"fine-tuning changed only {moved} tensors"
    assert worst["linear"] < 1e-6 and worst["linear2"] < 1e-6, f"linear merges: max abs diff {worst}"
    assert worst["task_arithmetic"] < 1e-5, f"task_arithmetic merge: max abs diff {worst['task_arithmetic']:.3g}"
    assert worst["slerp"] < 1e-5, f"slerp merge: max abs diff {worst['slerp']:.3g}"
    print("max abs diff vs recomputed merges:", {k: f"{v:.2g}" for k, v in worst.items()})


@pytest.mark.slow
def test_retention_is_merged_over_individual_accuracy(miniature):
    out, results = miniature
    individual = results["baselines"]["individual"]
    assert set(results["methods"]) == {"linear", "slerp", "task_arithmetic"}
    assert results["methods"]["slerp"]["tasks"] == ["sentiment", "tense"]
    assert set(results["references"]) == {"linear [sentiment + tense]", "task_arithmetic [sentiment + tense]"}
    for _name, record in [*results["methods"].items(), *results["references"].items()]:
        assert record["status"] == "ok", record
        assert set(record["accuracy"]) == set(record["tasks"])
        for task, acc in record["accuracy"].items():
            assert 0.0 <= acc <= 1.0
            assert record["retention"][task] == pytest.approx(acc / individual[task])
        assert record["mean_retention"] == pytest.approx(sum(record["retention"].values()) / len(record["tasks"]))
    # The cross table's diagonal is the individual ceiling; accuracies are multiples of 1/32 (32 test rows).
    for task, acc in individual.items():
        assert results["baselines"]["cross"][task][task] == acc
        assert (acc * 32) == pytest.approx(round(acc * 32))


@pytest.mark.slow
def test_outputs_are_written(miniature):
    out, results = miniature
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["linear"]["accuracy"] == results["methods"]["linear"]["accuracy"]
    assert saved["versions"]["torch"] == torch.__version__
    assert str(out) not in json.dumps(saved["methods"]), "recipes in results.json should not name this machine"
    table = (out / "retention.md").read_text()
    for row in ("frozen encoder + linear probe", "individual fine-tunes (ceiling)", "**linear**",
                "**task_arithmetic**", "lambda=0.5", "*merges of all 3 encoders*",
                "*merges of the 'sentiment' and 'tense' encoders only*", "**linear (reference)**", "**slerp**"):
        assert row in table, f"missing {row!r} in retention.md"
    assert (out / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / ".gitignore").read_text().split() == ["encoders/", "heads/", "merges/"]


@pytest.mark.slow
def test_rerun_reuses_the_cached_fine_tunes(miniature):
    out, first = miniature
    again = exp.run(_miniature(out, methods=("linear",), keep_merges=False))
    assert all(f["cached"] for f in again["finetunes"].values())
    assert not any(f["cached"] for f in first["finetunes"].values())
    assert again["baselines"]["individual"] == first["baselines"]["individual"]
    assert again["methods"]["linear"]["accuracy"] == first["methods"]["linear"]["accuracy"]
    assert not (out / "merges" / "linear").exists(), "merges are removed unless keep_merges"
