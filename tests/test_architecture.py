"""The package's shape: imports point down (import-linter's contract in pyproject.toml, run here
and by .ci/run), the compiled module is reached only through pyllm.kernels, and no module imports
another of pyllm's inside a function (the way a cycle hides)."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pyllm

PACKAGE = Path(pyllm.__file__).parent
REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(PACKAGE.rglob("*.py"))


def _imported(node: ast.AST, module: str) -> list[str]:
    """The modules an import statement names, absolute (relative ones resolved within `module`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parent = module.rsplit(".", node.level)[0]
        base = f"{parent}.{base}" if base else parent
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_is_found():
    assert len(MODULES) > 20


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_only_kernels_imports_the_compiled_module(path):
    module = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and "pyllm._C" in _imported(node, module):
            assert module == "pyllm.kernels", f"{module} imports pyllm._C (line {node.lineno}): use pyllm.kernels"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_of_pyllm_is_imported_inside_a_function(path):
    module = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    names = _imported(inner, module)
                    assert not any(n == "pyllm" or n.startswith("pyllm.") for n in names), \
                        f"{module}:{inner.lineno} imports {names[0]} inside {node.name}()"


def test_the_import_contract_holds():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (it is in the test extra)")
    result = subprocess.run([lint, "--no-cache", str(REPO / "pyproject.toml")], capture_output=True, text=True,
                            cwd=str(REPO))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"\b0 broken", result.stdout), result.stdout[-3000:]
