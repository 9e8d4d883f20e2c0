"""The tests' own layout: no test imports another test module or a conftest (pytest injects fixtures by name;
plain helpers live in helper modules such as tests/helpers.py), and tests/ mirrors the package's folders."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "src" / "mergegate"


def _imported_modules(path: Path) -> list[str]:
    """Every module `path` imports, relative imports resolved against its place in tests/."""
    package = path.relative_to(TESTS.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from . import test_x` imports a module by its name
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return found


def test_no_test_imports_a_test_module_or_a_conftest():
    offending = []
    for path in sorted(TESTS.rglob("*.py")):
        for module in _imported_modules(path):
            last = module.rsplit(".", 1)[-1]
            if (last.startswith("test_") or last == "conftest") and (module.startswith("tests") or "." not in module):
                offending.append(f"{path.relative_to(TESTS)}: {module}")
    assert not offending


def test_every_test_folder_is_a_package_and_mirrors_one_of_the_package():
    folders = {path.parent for path in TESTS.rglob("test_*.py")}
    assert not [folder.relative_to(TESTS) for folder in folders if not (folder / "__init__.py").is_file()]
    unmirrored = [folder.relative_to(TESTS) for folder in folders - {TESTS}
                  if not (PACKAGE / folder.relative_to(TESTS)).is_dir()]
    assert not unmirrored
    assert (TESTS / "export" / "test_gguf.py").is_file()  # as src/mergegate/export/gguf.py
