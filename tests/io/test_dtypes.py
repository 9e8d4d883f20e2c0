"""Dtype names: one table (mergegate.io.dtypes) that recipes, merges, the mixture of experts and LoRA folding read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import mergegate
from mergegate.io.dtypes import DTYPE_NAMES, canonical_name, declared_dtype, torch_dtype

PACKAGE = Path(mergegate.__file__).parent


def test_names_aliases_and_declared_dtypes():
    assert [torch_dtype(name) for name in DTYPE_NAMES] == [torch.float32, torch.float16, torch.bfloat16,
                                                            torch.float64]
    assert (canonical_name("bf16"), canonical_name("half"), canonical_name("float64")) == ("bfloat16", "float16",
                                                                                         "float64")
    assert canonical_name("int8") == "int8" and canonical_name(3) == 3  # left for the validator to name
    with pytest.raises(KeyError):
        torch_dtype("int8")
    assert declared_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert declared_dtype({"dtype": "float16"}) == torch.float16  # transformers 5's key
    assert declared_dtype({"torch_dtype": "float64"}, ("float32", "float16", "bfloat16")) is None
    assert declared_dtype({"torch_dtype": ["float32"]}) is None and declared_dtype({}) is None


def test_no_other_module_spells_out_a_dtype_table():
    """A dict or Literal listing float32, float16 and bfloat16 by name is a dtype table: it lives in io/dtypes."""
    tables = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "io" / "dtypes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            parts = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(node, ast.Tuple) else []
            names = {part.value for part in parts if isinstance(part, ast.Constant)}
            if {"float32", "float16", "bfloat16"} <= names:
                tables.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not tables
