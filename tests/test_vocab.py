"""Vocabulary merging: tokenizers that differ by added tokens, aligned row by row by token string."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mergegate import merge
from mergegate.demo.samples import add_vocabulary, write_family
from mergegate.errors import IncompatibleModels, RecipeError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """base (95 tokens); ft1 adds <tool>, <json>; ft2 adds <json>, <sql> (at different ids than ft1's)."""
    family = write_family(tmp_path_factory.mktemp("vocab"), finetunes=2)
    add_vocabulary(family["ft1"], ["<tool>", "<json>"], seed=1)
    add_vocabulary(family["ft2"], ["<json>", "<sql>"], seed=2)
    return family


def weights(folder):
    return load_file(folder / "model.safetensors")


def ta_recipe(family, **extra):
    return {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
            "models": [{"model": str(family[m]), "parameters": {"weight": 1.0}} for m in ("ft1", "ft2")], **extra}


def test_union_vocabulary_aligns_rows_by_token(vocab_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merge(ta_recipe(vocab_family, tokenizer_source="union"), tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("<tool>", "<json>", "<sql>")] == [95, 96, 97]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 98
    out, base, ft1, ft2 = (weights(tmp_path / "out"), weights(vocab_family["base"]),
                           weights(vocab_family["ft1"]), weights(vocab_family["ft2"]))
    for name in (EMBED, HEAD):
        expected_shared = ft1[name][:95] + ft2[name][:95] - base[name]  # ordinary task arithmetic on shared rows
        assert torch.allclose(out[name][:95], expected_shared, atol=1e-6)
        # <tool> only in ft1: every model (base included) takes ft1's row, so the deltas vanish
        assert torch.allclose(out[name][95], ft1[name][95], atol=1e-6)
        # <json> in ft1 (id 96) and ft2 (id 95), not in base: the base's row is their mean; TA returns the mean
        mean = (ft1[name][96] + ft2[name][95]) / 2
        assert torch.allclose(out[name][96], mean, atol=1e-6)
        assert torch.allclose(out[name][97], ft2[name][96], atol=1e-6)  # <sql> only in ft2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == 98
    assert tokenizer("<sql>")["input_ids"][-1] == 97


def test_base_and_model_tokenizer_sources(vocab_family, tmp_path):
    from transformers import AutoTokenizer

    merge(ta_recipe(vocab_family, tokenizer_source="base"), tmp_path / "base", progress=False)
    out, base, ft1, ft2 = (weights(tmp_path / "base"), weights(vocab_family["base"]),
                           weights(vocab_family["ft1"]), weights(vocab_family["ft2"]))
    assert out[EMBED].shape[0] == 95  # the added tokens are dropped
    assert torch.allclose(out[EMBED], ft1[EMBED][:95] + ft2[EMBED][:95] - base[EMBED], atol=1e-6)

    merge(ta_recipe(vocab_family, tokenizer_source=str(vocab_family["ft2"])), tmp_path / "ft2", progress=False)
    vocab = AutoTokenizer.from_pretrained(tmp_path / "ft2").get_vocab()
    assert len(vocab) == 97 and vocab["<sql>"] == 96 and "<tool>" not in vocab
    assert weights(tmp_path / "ft2")[EMBED].shape[0] == 97


def test_tokens_section_forces_sources_and_pads(vocab_family, tmp_path):
    tokenizer = {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "<sql>": {"source": {"kind": "zero"}, "force": True},
        "<tool>": {"source": {"kind": "model_token", "model": str(vocab_family["ft2"]), "token": "<json>"}},
        "<new>": {"source": str(vocab_family["ft1"])}}}
    with pytest.raises(IncompatibleModels, match=r"tokenizer.tokens\['<new>'\]: model .* does not have this token"):
        merge(ta_recipe(vocab_family, tokenizer=tokenizer), tmp_path / "bad", progress=False)
    del tokenizer["tokens"]["<new>"]
    merge(ta_recipe(vocab_family, tokenizer=tokenizer), tmp_path / "out", progress=False)
    out = weights(tmp_path / "out")
    assert out[EMBED].shape[0] == 104  # 98 tokens padded to a multiple of 8
    assert torch.count_nonzero(out[EMBED][97]) == 0  # forced zero
    # <tool> is lacking in base and ft2: both take ft2's <json> row; ft1 keeps its own row
    ft1 = weights(vocab_family["ft1"])
    assert torch.allclose(out[EMBED][95], ft1[EMBED][95], atol=1e-6)
    # padding rows are each model's mean row; task arithmetic is linear, so the merged padding is the merged mean
    assert torch.allclose(out[EMBED][98:], out[EMBED][:98].mean(dim=0).expand(6, -1), atol=1e-6)


def test_differing_vocabularies_need_a_tokenizer_source(vocab_family, tmp_path):
    with pytest.raises(IncompatibleModels, match="set tokenizer_source: union"):
        merge(ta_recipe(vocab_family), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unrelated_vocabularies_are_refused(vocab_family, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    stranger = tmp_path / "stranger"
    shutil.copytree(vocab_family["base"], stranger)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(95)}, unk_token="w0"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (stranger / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(stranger)
    recipe = ta_recipe(vocab_family, tokenizer_source="union")
    recipe["models"][1]["model"] = str(stranger)
    with pytest.raises(IncompatibleModels, match=r"share only 0% of their tokens \(0 of 95\): unrelated vocabularies"):
        merge(recipe, tmp_path / "out", progress=False)


def test_chat_template_selection(vocab_family, tmp_path):
    from transformers import AutoTokenizer

    family = {k: vocab_family[k] for k in ("base",)}
    recipe = {"merge_method": "linear", "models": [{"model": str(family["base"]), "parameters": {"weight": 1.0}}],
              "chat_template": "chatml"}
    merge(recipe, tmp_path / "chatml", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "chatml")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert weights(tmp_path / "chatml")[EMBED].shape[0] == 95

    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    merge({**recipe, "chat_template": custom}, tmp_path / "custom", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "custom").chat_template == custom
    with pytest.raises(RecipeError, match="unknown template 'chatgpt'.*bundled: alpaca, chatml"):
        merge({**recipe, "chat_template": "chatgpt"}, tmp_path / "bad", progress=False)
    with pytest.raises(RecipeError, match="'auto' found no chat template"):
        merge({**recipe, "chat_template": "auto"}, tmp_path / "auto", progress=False)


@pytest.mark.parametrize("tokenizer_keys", [
    {"tokenizer_source": "union"},
    {"tokenizer_source": "base"},
    {"tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "<sql>": {"source": {"kind": "zero"}, "force": True}, "<tool>": {"source": {"kind": "model_token", "model": "FT2", "token": "<json>"}}}}},
], ids=["union", "base", "tokens-section"])
def test_rows_agree_with_mergekit_token_by_token(vocab_family, tmp_path, tokenizer_keys, monkeypatch):
    """mergekit 0.1.5 orders a union's new tokens by hash-map iteration (it varies from run to run), so rows are
    compared by token string; mergegate's order is deterministic (each model's ids, recipe order)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    keys = json.loads(json.dumps(tokenizer_keys).replace('"FT2"', json.dumps(str(vocab_family["ft2"]))))
    recipe = ta_recipe(vocab_family, **keys)
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=True, quiet=True))
    merge(recipe, tmp_path / "mg", progress=False)
    theirs, ours = weights(tmp_path / "mk"), weights(tmp_path / "mg")
    their_ids = json.loads((tmp_path / "mk" / "tokenizer.json").read_text())
    our_ids = json.loads((tmp_path / "mg" / "tokenizer.json").read_text())
    their_vocab = {**their_ids["model"]["vocab"], **{t["content"]: t["id"] for t in their_ids["added_tokens"]}}
    our_vocab = {**our_ids["model"]["vocab"], **{t["content"]: t["id"] for t in our_ids["added_tokens"]}}
    assert their_vocab.keys() == our_vocab.keys()
    tokens = sorted(our_vocab, key=our_vocab.get)
    for name in (EMBED, HEAD):
        assert theirs[name].shape == ours[name].shape
        mine = ours[name][[our_vocab[t] for t in tokens]]
        peer = theirs[name][[their_vocab[t] for t in tokens]]
        worst = (mine - peer).abs().max().item()
        assert worst <= 1e-6, f"{name}: max abs diff {worst:.3g} vs mergekit"
        if theirs[name].shape[0] > len(tokens):  # padding rows: each model's mean row, merged
            assert (ours[name][len(tokens):] - theirs[name][len(tokens):]).abs().max().item() <= 1e-6
