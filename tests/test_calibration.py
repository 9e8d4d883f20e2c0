"""Calibration text and statistics: JSONL parsing, Gram and Fisher against independent computations, the cache."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mergegate import calibration
from mergegate.calibration import CalibrationSettings, compute_statistics, ensure_statistics, load_calibration_texts
from mergegate.errors import RecipeError

pytestmark = pytest.mark.one_torch_thread

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Paris is the capital of France.",
    "x",  # one token: no next token for the Fisher, one token for the Gram
    "0123456789 and back again: 9876543210",
]



@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    return path


def _rows(model_dir, texts, max_length=64):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


# -- calibration text ---------------------------------------------------------------------------------
def test_rows_are_text_or_prompt_plus_reference_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "alpha"}, {"prompt": "Q: 2+2?", "reference": "4"}, {"prompt": "Say hi\n", "reference": "hi"},
            {"text": "fourth", "cohort": "extra keys are ignored"}]
    path.write_text("\n\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_calibration_texts(path, 10) == ["alpha", "Q: 2+2? 4", "Say hi\nhi", "fourth"]
    assert load_calibration_texts(path, 2) == ["alpha", "Q: 2+2? 4"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"text": ""}', "line 2: 'text' must be a non-empty string"),
    ('{"prompt": "only"}', "line 2: needs a 'text' string, or 'prompt' and 'reference' strings "
                           "\\(found keys: prompt\\)"),
])
def test_a_malformed_row_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(RecipeError, match=r"calibration file .*bad\.jsonl, " + message):
        load_calibration_texts(path, 10)


def test_empty_and_missing_files_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(RecipeError, match="empty.jsonl: holds no rows"):
        load_calibration_texts(tmp_path / "empty.jsonl", 10)
    with pytest.raises(RecipeError, match="cannot be read"):
        load_calibration_texts(tmp_path / "nope.jsonl", 10)
    with pytest.raises(RecipeError, match="calibration.batch_size must be at least 1"):
        CalibrationSettings(batch_size=0)


# -- statistics against independent computations -------------------------------------------------------
def test_gram_equals_xtx_of_the_layer_inputs_captured_with_a_forward_hook(family, calib):
    from transformers import AutoModelForCausalLM

    # batch_size 2 forces right-padding; the reference runs row by row without any padding
    stats, meta = compute_statistics(family["ft1"], calib, "gram", CalibrationSettings(max_length=64, batch_size=2))
    model = AutoModelForCausalLM.from_pretrained(family["ft1"]).eval()
    layers = {"model.layers.0.self_attn.q_proj": [], "model.layers.1.mlp.down_proj": [], "lm_head": []}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: layers[n].append(i[0][0].detach().double()))
             for n in layers]
    with torch.no_grad():
        for row in _rows(family["ft1"], TEXTS):
            model(input_ids=torch.tensor([row]))
    for h in hooks:
        h.remove()
    tokens = sum(len(r) for r in _rows(family["ft1"], TEXTS))
    assert int(meta["tokens"]) == tokens and meta["kind"] == "gram"
    for name, xs in layers.items():
        x = torch.cat(xs)
        expected = x.T @ x / tokens
        got = stats[f"{name}.weight"].double()
        diff = float((got - expected).abs().max())
        assert diff < 1e-5 * float(expected.abs().max()), f"{name}: max abs diff {diff:.2e}"
        print(f"gram {name}: max abs diff {diff:.2e} (max |G| {float(expected.abs().max()):.3f})")
    # q, k and v read the same input: the same Gram
    assert torch.equal(stats["model.layers.0.self_attn.q_proj.weight"], stats["model.layers.0.self_attn.v_proj.weight"])
    assert set(stats) == {f"{n}.weight" for n, m in modules.items() if isinstance(m, torch.nn.Linear)}


def test_fisher_equals_squared_gradients_of_the_row_log_likelihood(family, calib):
    from transformers import AutoModelForCausalLM

    stats, meta = compute_statistics(family["ft2"], calib, "fisher", CalibrationSettings(max_length=64))
    model = AutoModelForCausalLM.from_pretrained(family["ft2"]).eval()
    name = "model.layers.0.mlp.up_proj.weight"
    param = dict(model.named_parameters())[name]
    total, predicted = torch.zeros_like(param, dtype=torch.float64), 0
    rows = _rows(family["ft2"], TEXTS)
    for row in rows:
        if len(row) < 2:
            continue
        ids = torch.tensor([row])
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum")
        (grad,) = torch.autograd.grad(loss, param)
        total += grad.double() ** 2
        predicted += len(row) - 1
    expected = total / predicted
    diff = float((stats[name].double() - expected).abs().max())
    print(f"fisher {name}: max abs diff {diff:.2e} (max F {float(expected.max()):.3e})")
    assert int(meta["tokens"]) == predicted
    assert diff < 1e-5 * float(expected.max()), f"max abs diff {diff:.2e}"
    # every parameter has a Fisher; embedding rows of tokens absent from the text have exactly zero
    assert set(stats) == {n for n, _ in model.named_parameters()}
    used = {t for row in rows for t in row}
    unused = [t for t in range(model.config.vocab_size) if t not in used]
    assert unused and float(stats["model.embed_tokens.weight"][unused].abs().max()) == 0.0


# -- the cache ------------------------------------------------------------------------------------------
def test_statistics_are_cached_by_model_text_and_settings(family, calib, tmp_path, monkeypatch):
    settings = CalibrationSettings(max_rows=3, max_length=32)
    calls = []
    real = calibration.compute_statistics
    monkeypatch.setattr(calibration, "compute_statistics", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = ensure_statistics(family["ft1"], calib, "gram", settings, cache_dir=tmp_path)
    stamp = os.stat(first / calibration.STATISTICS_FILE).st_mtime_ns
    again = ensure_statistics(family["ft1"], calib, "gram", settings, cache_dir=tmp_path)
    assert again == first and len(calls) == 1
    assert os.stat(first / calibration.STATISTICS_FILE).st_mtime_ns == stamp
    meta = json.loads((first / "config.json").read_text())["mergegate_statistics"]
    assert meta["rows"] == "3" and meta["model"] == str(family["ft1"].resolve())

    other_text = tmp_path / "other.jsonl"
    other_text.write_text(calib.read_text().replace("fox", "cat"))
    assert ensure_statistics(family["ft1"], other_text, "gram", settings, cache_dir=tmp_path) != first
    assert ensure_statistics(family["ft1"], calib, "gram", CalibrationSettings(max_rows=2, max_length=32),
                             cache_dir=tmp_path) != first
    assert len(calls) == 3

    (first / calibration.STATISTICS_FILE).write_bytes(b"\x00" * 4)  # a damaged entry is recomputed
    assert ensure_statistics(family["ft1"], calib, "gram", settings, cache_dir=tmp_path) == first
    assert len(calls) == 4
    assert not list(tmp_path.glob(".*.tmp"))  # no staging folder left behind
