"""Fisher merging and RegMean: the math on hand-built tensors, then whole recipes on tiny Llama models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import mergegate
from mergegate import calibration
from mergegate.errors import RecipeError
from mergegate.methods import get_method

from ..helpers import recipe_for

pytestmark = pytest.mark.one_torch_thread

T = lambda *values: torch.tensor(values, dtype=torch.float32)  # noqa: E731



def run(name, tensors, stats, weights=None, **shared):
    method = get_method(name)
    weights = weights or [1.0] * len(tensors)
    return method(None, tensors, [method.per_model(weight=w) for w in weights], method.shared(**shared), None,
                  stats=stats)


# -- registry -----------------------------------------------------------------------------------------
def test_declarations_defaults_and_statistics_kinds():
    fisher, regmean = get_method("fisher"), get_method("regmean")
    assert (fisher.statistics, regmean.statistics) == ("fisher", "gram")
    assert fisher.elementwise and not regmean.elementwise
    assert fisher.base == regmean.base == "ignored"
    assert {p.name: p.default for p in fisher.shared_params} == {"fisher_floor": 1e-6}
    assert {p.name: p.default for p in regmean.shared_params} == {"reduce_non_diagonal_ratio": 0.9}
    assert {p.name: p.default for p in regmean.per_model_params} == {"weight": 1.0}
    linear = get_method("linear")
    with pytest.raises(TypeError, match="linear takes no calibration statistics"):
        linear(None, [T(1.0)], [linear.per_model(weight=1.0)], linear.shared(), None, stats=[T(1.0)])


# -- fisher -------------------------------------------------------------------------------------------
def test_fisher_with_equal_fishers_is_the_weighted_average():
    a, b = T(1, 2, -3), T(3, 6, 5)
    f = T(0.5, 2.0, 1e-3)
    got = run("fisher", [a, b], [f, f.clone()], weights=[1.0, 3.0])
    assert torch.allclose(got, (a + 3 * b) / 4, atol=1e-6), (got, (a + 3 * b) / 4)


def test_fisher_with_zero_fisher_for_one_model_is_the_other_model():
    a, b = T(1, 2, -3), T(3, 6, 5)
    got = run("fisher", [a, b], [torch.zeros(3), T(0.2, 1.0, 7.0)])
    # the floor gives model a a relative importance of 1e-6: the result is b to within ~1e-5
    assert torch.allclose(got, b, atol=1e-5), f"max abs diff {float((got - b).abs().max()):.2e}"
    exact = run("fisher", [a, b], [torch.zeros(3), T(0.2, 1.0, 7.0)], fisher_floor=0.0)
    assert torch.equal(exact, b)


def test_fisher_hand_computed_weights_floor_and_all_zero_fallback():
    a, b = T(1, 10, 4), T(3, 20, 8)
    fa, fb = T(1, 0, 0), T(3, 1, 0)
    got = run("fisher", [a, b], [fa, fb], weights=[2.0, 1.0], fisher_floor=0.0)
    # element 0: (2·1·1 + 1·3·3)/(2·1 + 1·3) = 11/5; element 1: only b informs; element 2: nobody → (2·4 + 8)/3
    assert torch.allclose(got, T(11 / 5, 20, 16 / 3)), got
    # the floor is relative to the larger Fisher, so scaling every Fisher changes nothing
    floored = run("fisher", [a, b], [fa, fb], weights=[2.0, 1.0], fisher_floor=0.1)
    scaled = run("fisher", [a, b], [fa * 1e4, fb * 1e4], weights=[2.0, 1.0], fisher_floor=0.1)
    assert torch.allclose(floored, scaled, rtol=1e-6)
    # element 1 with floor 0.1·max = 0.1: (2·0.1·10 + 1·1.1·20)/(2·0.1 + 1.1)
    assert abs(float(floored[1]) - (2 * 0.1 * 10 + 1.1 * 20) / (0.2 + 1.1)) < 1e-5


def test_fisher_without_statistics_averages_and_refuses_mismatched_shapes():
    a, b = T(1, 2), T(3, 4)
    assert torch.allclose(run("fisher", [a, b], [None, T(1, 1)]), T(2, 3))
    with pytest.raises(ValueError, match=r"Fisher of input 1 has shape \[3\]"):
        run("fisher", [a, b], [T(1, 1), T(1, 1, 1)])
    with pytest.raises(ValueError, match="statistics of input 0 hold NaN"):
        run("fisher", [a, b], [T(float("nan"), 1), T(1, 1)])


# -- regmean ------------------------------------------------------------------------------------------
def test_regmean_with_identity_grams_is_the_weighted_average():
    torch.manual_seed(0)
    w1, w2 = torch.randn(5, 4), torch.randn(5, 4)
    eye = torch.eye(4)
    got = run("regmean", [w1, w2], [eye, eye * 1.0], weights=[1.0, 2.0])
    assert torch.allclose(got, (w1 + 2 * w2) / 3, atol=1e-6), float((got - (w1 + 2 * w2) / 3).abs().max())


def test_regmean_with_diagonal_grams_is_a_per_column_weighted_average():
    w1 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w2 = torch.tensor([[7.0, 8.0, 9.0], [-1.0, 0.0, 1.0]])
    g1, g2 = torch.diag(T(1, 3, 0.5)), torch.diag(T(3, 1, 0.5))
    got = run("regmean", [w1, w2], [g1, g2])
    expected = torch.stack([(w1[:, c] * g1[c, c] + w2[:, c] * g2[c, c]) / (g1[c, c] + g2[c, c]) for c in range(3)], 1)
    # column 0: (1·1 + 7·3)/4 = 5.5; column 1: (2·3 + 8·1)/4 = 3.5; column 2: plain mean 6
    assert torch.allclose(got, expected, atol=1e-6) and abs(float(got[0, 0]) - 5.5) < 1e-6, got


def test_regmean_recovers_the_stacked_least_squares_solution():
    """W* minimises Σ_i w_i ||W X_i − W_i X_i||²: compare with lstsq on the stacked, sqrt(w)-scaled regressions."""
    gen = torch.Generator().manual_seed(3)
    d_in, d_out = 6, 4
    xs = [torch.randn(40, d_in, generator=gen, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=gen,
                                                                                    dtype=torch.float64)
          for _ in range(3)]
    ws = [torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for _ in range(3)]
    coeff = [1.0, 0.5, 2.0]
    grams = [(x.T @ x / x.shape[0]).float() for x in xs]
    got = run("regmean", [w.float() for w in ws], grams, weights=coeff, reduce_non_diagonal_ratio=1.0)
    design = torch.cat([x * (c / x.shape[0]) ** 0.5 for x, c in zip(xs, coeff)])
    targets = torch.cat([(x @ w.T) * (c / x.shape[0]) ** 0.5 for x, w, c in zip(xs, ws, coeff)])
    expected = torch.linalg.lstsq(design, targets).solution.T
    diff = float((got.double() - expected).abs().max())
    assert diff < 1e-5, f"max abs diff to least squares {diff:.2e}"


def test_regmean_shrinks_off_diagonals_by_alpha():
    g1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    g2 = torch.tensor([[1.0, -0.5], [-0.5, 3.0]])
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    alpha = 0.3
    s1 = torch.tensor([[2.0, 0.3], [0.3, 2.0]])
    s2 = torch.tensor([[1.0, -0.15], [-0.15, 3.0]])
    expected = (w1 @ s1 + w2 @ s2) @ torch.linalg.inv(s1 + s2)
    got = run("regmean", [w1, w2], [g1, g2], reduce_non_diagonal_ratio=alpha)
    assert torch.allclose(got, expected, atol=1e-6), (got, expected)


def test_regmean_dead_features_average_and_singular_grams_stay_finite():
    w1, w2 = torch.tensor([[1.0, 4.0, 2.0]]), torch.tensor([[3.0, 8.0, 6.0]])
    g = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0]])  # feature 1 never fires
    got = run("regmean", [w1, w2], [g, g.clone()], reduce_non_diagonal_ratio=1.0)
    assert torch.allclose(got, (w1 + w2) / 2, atol=1e-6), got  # equal Grams: the average, column 1 included
    # rank-one Grams (one token each) with alpha = 1: singular sum, solved with the ridge, finite
    x1, x2 = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[1.0, 2.0, 0.5]])
    got = run("regmean", [w1, w2], [x1.T @ x1, x2.T @ x2], reduce_non_diagonal_ratio=1.0)
    assert bool(torch.isfinite(got).all())
    assert torch.allclose(got @ x1.T, ((w1 + w2) / 2) @ x1.T, atol=1e-4)  # reproduces the mean output on x


def test_regmean_averages_tensors_without_grams_and_refuses_wrong_shapes():
    a, b = T(1, 2), T(3, 4)
    assert torch.allclose(run("regmean", [a, b], [None, None]), T(2, 3))
    with pytest.raises(ValueError, match=r"Gram matrix of input 0 has shape \[3, 3\], expected \[2, 2\]"):
        run("regmean", [torch.ones(4, 2), torch.ones(4, 2)], [torch.eye(3), torch.eye(2)])


# -- recipes --------------------------------------------------------------------------------------------
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging models: average the weights, then check every cohort.",
    "def add(a, b):\n    return a + b",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "0123456789 + 9876543210 = 9999999999",
    "She sells sea shells by the sea shore!",
]


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    rows = [{"text": t} for t in TEXTS[:4]] + [{"prompt": "Q: 2+2?", "reference": "A: 4"}, {"text": TEXTS[4]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MERGEGATE_CACHE", str(folder))
    return folder


def _recipe(method, family, calib, **parameters):
    recipe = recipe_for(method, family, models=("ft1", "ft2"), base=False, weights=[1.0, 0.5], **parameters)
    recipe["calibration"] = {"path": str(calib), "max_rows": 6, "max_length": 64, "batch_size": 4}
    return recipe


def _entries(cache):
    return sorted((cache / "statistics").glob("*-*/statistics.safetensors"))


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_recipe_merges_to_a_loadable_model_and_reuses_cached_statistics(method, family, calib, cache, tmp_path,
                                                                        monkeypatch):
    from transformers import AutoModelForCausalLM

    result = mergegate.merge(_recipe(method, family, calib), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape[-1] == model.config.vocab_size and bool(torch.isfinite(logits).all())

    entries = _entries(cache)
    assert len(entries) == 2, entries  # one per input model
    stamps = [os.stat(p).st_mtime_ns for p in entries]

    def recompute(*args, **kwargs):
        raise AssertionError("statistics were recomputed although cached")

    monkeypatch.setattr(calibration, "compute_statistics", recompute)
    again = mergegate.merge(_recipe(method, family, calib), tmp_path / "again")
    assert [os.stat(p).st_mtime_ns for p in _entries(cache)] == stamps
    first, second = load_file(result.out_dir / "model.safetensors"), load_file(again.out_dir / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    if method == "fisher":  # elementwise: row chunks read the same rows of the statistics, same bytes
        from mergegate.engine import plan as plan_module

        monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1000)
        assert any(job.rows for job in mergegate.plan_merge(_recipe(method, family, calib)).jobs)
        chunked = load_file(mergegate.merge(_recipe(method, family, calib), tmp_path / "chunked").out_dir
                            / "model.safetensors")
        assert all(torch.equal(first[k], chunked[k]) for k in first)

    # the merged tensors follow the method's formula on the cached statistics
    stats = {m: load_file(e) for m, e in zip(("ft1", "ft2"), _stats_by_model(entries, family))}
    w1, w2 = (load_file(family[m] / "model.safetensors") for m in ("ft1", "ft2"))
    name = "model.layers.1.mlp.down_proj.weight"
    if method == "fisher":
        f1, f2 = stats["ft1"][name].double(), stats["ft2"][name].double()
        floor = torch.maximum(f1, f2) * 1e-6
        i1, i2 = (f1 + floor) * 1.0, (f2 + floor) * 0.5
        expected = (i1 * w1[name].double() + i2 * w2[name].double()) / (i1 + i2)
    else:
        g1, g2 = (0.9 * g.double() + 0.1 * torch.diag(torch.diagonal(g.double()))
                  for g in (stats["ft1"][name], stats["ft2"][name]))
        expected = (w1[name].double() @ g1 + 0.5 * w2[name].double() @ g2) @ torch.linalg.inv(g1 + 0.5 * g2)
    diff = float((first[name].double() - expected).abs().max())
    assert diff < 1e-5, f"{method}: max abs diff to the formula {diff:.2e}"
    norm = "model.norm.weight"  # no Gram for norms: RegMean averages; fisher weighs by Fisher
    if method == "regmean":
        assert torch.allclose(first[norm], (w1[norm] + 0.5 * w2[norm]) / 1.5, atol=1e-6)


def _stats_by_model(entries, family):
    by_model = {}
    for entry in entries:
        meta = json.loads((entry.parent / "config.json").read_text())["mergegate_statistics"]
        by_model[meta["model"]] = entry
    return [by_model[str(family[m].resolve())] for m in ("ft1", "ft2")]


def test_recipe_without_calibration_is_refused_naming_calibration(family):
    recipe = recipe_for("regmean", family, models=("ft1", "ft2"), base=False)
    with pytest.raises(RecipeError, match="calibration"):
        mergegate.plan_merge(recipe)


def test_malformed_calibration_row_names_file_and_line(family, tmp_path, cache):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"prompt": "only a prompt"}\n')
    recipe = _recipe("fisher", family, path)
    with pytest.raises(RecipeError, match=r"bad\.jsonl, line 3: needs a 'text' string"):
        mergegate.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_calibration_path_resolves_beside_the_recipe(family, tmp_path, write_recipe, cache):
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    recipe = recipe_for("regmean", family, models=("ft1", "ft2"), base=False)
    recipe["calibration"] = {"path": "calib.jsonl", "max_rows": 3}
    plan = mergegate.plan_merge(write_recipe(recipe))
    assert sorted(plan.statistics) == sorted(str(family[m]) for m in ("ft1", "ft2"))
    recipe["calibration"]["path"] = "missing.jsonl"
    with pytest.raises(RecipeError, match="calibration.path: no such file 'missing.jsonl'"):
        mergegate.plan_merge(write_recipe(recipe))


def test_regmean_layers_reproduce_each_source_better_than_linear_averaging(family, calib, cache, tmp_path):
    """On the calibration inputs, RegMean's merged Linear layers are closer (MSE) to each source's own outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_for("regmean", family, models=("ft1", "ft2", "ft3"), base=False)
    recipe["calibration"] = {"path": str(calib), "max_rows": 6}
    regmean = load_file(mergegate.merge(recipe, tmp_path / "regmean").out_dir / "model.safetensors")
    sources = {m: load_file(family[m] / "model.safetensors") for m in ("ft1", "ft2", "ft3")}
    texts = calibration.load_calibration_texts(calib, 6)
    tokenizer = AutoTokenizer.from_pretrained(family["ft1"])
    err = {"regmean": 0.0, "linear": 0.0}
    better, layers = 0, 0
    for model_name, weights in sources.items():
        model = AutoModelForCausalLM.from_pretrained(family[model_name]).eval()
        captured: dict[str, list[torch.Tensor]] = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n, captured=captured: captured.setdefault(n, []).append(inp[0][0]))
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for text in texts:
                model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
        for h in hooks:
            h.remove()
        for module, xs in captured.items():
            x = torch.cat(xs).double()
            name = f"{module}.weight"
            own = x @ weights[name].double().T
            linear = sum(s[name].double() for s in sources.values()) / 3
            e_reg = float(((x @ regmean[name].double().T - own) ** 2).mean())
            e_lin = float(((x @ linear.T - own) ** 2).mean())
            err["regmean"] += e_reg
            err["linear"] += e_lin
            better += e_reg < e_lin
            layers += 1
    print(f"summed layer-output MSE over {layers} (layer, source) pairs: regmean {err['regmean']:.4e}, "
          f"linear {err['linear']:.4e}; regmean closer in {better}/{layers}")
    assert err["regmean"] < err["linear"], err


def test_calibration_is_recorded_in_provenance_and_refused_for_other_methods(tmp_path):
    import hashlib
    import json

    from mergegate import merge
    from mergegate.demo.samples import write_family
    from mergegate.errors import RecipeError
    from mergegate.recipe import load_recipe

    family = write_family(tmp_path / "family", finetunes=2)
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text("".join(json.dumps({"text": f"hello world {i}"}) + "\n" for i in range(4)))
    recipe = {"merge_method": "fisher", "models": [{"model": str(family[m])} for m in ("ft1", "ft2")],
              "calibration": {"path": str(calibration), "max_rows": 4}}
    merge(recipe, tmp_path / "out", progress=False)
    record = json.loads((tmp_path / "out" / "mergegate.json").read_text())
    digest = hashlib.sha256(calibration.read_bytes()).hexdigest()
    assert [entry["sha256"] for entry in record["calibration"].values()] == [digest, digest]
    with pytest.raises(RecipeError, match="'calibration' is only read by data-aware methods .* not by linear"):
        load_recipe({**recipe, "merge_method": "linear"})


def test_regmean_merges_encoders_and_fisher_refuses_them(tmp_path):
    """RegMean needs only each Linear's inputs, so a BertModel works; Fisher needs a next-token likelihood."""
    import json

    from transformers import AutoModel, BertConfig, BertModel

    from mergegate import merge
    from mergegate.demo.samples import write_finetune, write_tokenizer
    from mergegate.errors import RecipeError

    base = tmp_path / "bert"
    base.mkdir()
    vocab = write_tokenizer(base)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(base)
    sources = [write_finetune(base, tmp_path / f"bert{i}", seed=i) for i in (1, 2)]
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n" for i in range(6)))
    recipe = {"merge_method": "regmean", "models": [{"model": str(s)} for s in sources],
              "calibration": {"path": str(calibration)}}
    merge(recipe, tmp_path / "out", progress=False)
    merged = AutoModel.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.isfinite(merged(input_ids=ids).last_hidden_state).all()
    query = "encoder.layer.0.attention.self.query.weight"
    average = sum(AutoModel.from_pretrained(s).state_dict()[query] for s in sources) / 2
    assert not torch.allclose(merged.state_dict()[query], average)  # the Grams shaped it, not a plain mean
    with pytest.raises(RecipeError, match="fisher needs a causal language model"):
        merge({**recipe, "merge_method": "fisher"}, tmp_path / "fisher", progress=False)


def test_each_model_may_bring_its_own_calibration_text(tmp_path):
    """RegMean's setting: each model's Gram matrices from the data it was tuned for (models[i].calibration)."""
    import hashlib
    import json

    from mergegate import merge
    from mergegate.demo.samples import write_family
    from mergegate.errors import RecipeError

    family = write_family(tmp_path / "family", finetunes=2)
    texts = {"ft1": ["12+30=42", "7+8=15"], "ft2": ['{"name": "ana"}', '{"age": 3}']}
    files = {}
    for name, rows in texts.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    recipe = {"merge_method": "regmean", "models": [{"model": str(family[m]), "calibration": str(files[m])}
                                                     for m in ("ft1", "ft2")]}
    merge(recipe, tmp_path / "own", progress=False)
    record = json.loads((tmp_path / "own" / "mergegate.json").read_text())["calibration"]
    assert record[str(family["ft1"])]["sha256"] == hashlib.sha256(files["ft1"].read_bytes()).hexdigest()
    assert record[str(family["ft2"])]["sha256"] == hashlib.sha256(files["ft2"].read_bytes()).hexdigest()
    shared = {**recipe, "models": [{"model": str(family[m])} for m in ("ft1", "ft2")],
              "calibration": {"path": str(files["ft1"])}}
    merge(shared, tmp_path / "shared", progress=False)
    name = "model.layers.0.mlp.down_proj.weight"
    from safetensors.torch import load_file
    own, same = load_file(tmp_path / "own" / "model.safetensors"), load_file(tmp_path / "shared" / "model.safetensors")
    assert not torch.equal(own[name], same[name])  # ft2's own text changed its Gram matrices, so the merge
    half = {**recipe, "models": [recipe["models"][0], {"model": str(family["ft2"])}]}
    with pytest.raises(RecipeError, match="needs calibration text.*or give every model its own"):
        merge(half, tmp_path / "half", progress=False)
    with pytest.raises(RecipeError, match="'calibration' is only read by data-aware methods"):
        merge({**recipe, "merge_method": "linear", "models": [{**m, "parameters": {"weight": 1.0}}
                                                               for m in recipe["models"]]}, tmp_path / "lin")
