"""The layering the README's design table promises, checked on the source.

ruff (``[tool.ruff]`` in pyproject.toml) bans onnxruntime outside the runner and click
outside the CLI; ruff cannot ban a module for one file only, so the full table is
checked here on the syntax tree of every module of the package:

- onnxruntime is imported only by ``bnfold/runner.py``, click only by ``bnfold/cli.py``;
- the verifier (``verification.py``, ``exact.py``) imports no fold module, directly or
  through another import, so it stays independent of what it checks;
- ``graph.py`` does not load the writer (``bnfold.modelio.write``);
- the host op names appear as string literals only in the host rules (``hosts.py``).

Each checker is first run on a small violating source, so a checker that finds nothing
cannot pass silently.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnfold"

# (imported module, the only package files allowed to import it)
ONLY_IMPORTED_BY: Dict[str, Set[str]] = {
    "onnxruntime": {"bnfold/runner.py"},
    "click": {"bnfold/cli.py"},
}
FOLD_MODULES = {"bnfold.fold", "bnfold.graph", "bnfold.hosts", "bnfold.reparam", "bnfold.insert"}
# (package file, modules it must never import)
NEVER_IMPORTS: Dict[str, Set[str]] = {
    "bnfold/verification.py": FOLD_MODULES,
    "bnfold/exact.py": FOLD_MODULES,
    "bnfold/graph.py": {"bnfold.modelio.write"},
}
HOST_RULES_FILE = "bnfold/hosts.py"


def package_files() -> Iterator[Tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), path


def module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> Set[str]:
    """Every module ``source`` imports (relative imports resolved against ``module``), with
    its parents (``a.b.c`` also counts as ``a.b`` and ``a``) and ``from m import name``
    also counted as ``m.name`` (it may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names = [origin] + [f"{origin}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def import_violations(rel: str, source: str) -> List[str]:
    imported = imported_modules(source, module_name(rel), rel.endswith("__init__.py"))
    out = [f"{rel} imports {m} (only {', '.join(sorted(allowed))} may)"
           for m, allowed in ONLY_IMPORTED_BY.items() if m in imported and rel not in allowed]
    out += [f"{rel} imports {m}" for m in sorted(NEVER_IMPORTS.get(rel, set()) & imported)]
    return out


def host_names() -> Set[str]:
    from bnfold.hosts import RULES

    return set(RULES)


def literal_violations(rel: str, source: str, names: Set[str]) -> List[str]:
    if rel == HOST_RULES_FILE:
        return []
    return [f"{rel}:{node.lineno} names host op {node.value!r}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]


# -- the checkers catch what they are meant to -----------------------------------------------

def test_import_checker_catches_each_rule():
    assert import_violations("bnfold/fold.py", "import onnxruntime as ort\n")
    assert import_violations("bnfold/workflow.py", "def f():\n    from onnxruntime import InferenceSession\n")
    assert import_violations("bnfold/runner.py", "import click\n")
    assert import_violations("bnfold/verification.py", "from .fold import fuse\n")
    assert import_violations("bnfold/exact.py", "from . import hosts\n")
    assert import_violations("bnfold/exact.py", "import bnfold.reparam\n")
    assert import_violations("bnfold/graph.py", "from .modelio.write import stage_model\n")
    assert import_violations("bnfold/graph.py", "from .modelio import write\n")
    # allowed: the runner and ORT, the CLI and click, the verifier and the loader
    assert not import_violations("bnfold/runner.py", "import onnxruntime\n")
    assert not import_violations("bnfold/cli.py", "import click\n")
    assert not import_violations("bnfold/verification.py", "from .modelio.load import load_model\n")


def test_literal_checker_catches_a_host_name():
    names = host_names()
    assert literal_violations("bnfold/insert.py", "OPS = ('Gemm',)\n", names)
    assert literal_violations("bnfold/exact.py", "OPS = ('Gemm',)\n", names)
    assert not literal_violations("bnfold/hosts.py", "OPS = ('Gemm',)\n", names)
    assert not literal_violations("bnfold/insert.py", "# Gemm in a comment\nx = 'Gemmish'\n", names)


# -- the package keeps the rules ---------------------------------------------------------------

def test_package_imports_keep_the_layering():
    problems = [v for rel, path in package_files() for v in import_violations(rel, path.read_text())]
    assert problems == []


def test_host_op_names_only_in_the_host_rules():
    names = host_names()
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul"} <= names
    problems = [v for rel, path in package_files() for v in literal_violations(rel, path.read_text(), names)]
    assert problems == []


@pytest.mark.parametrize("module, banned", [
    ("bnfold.verification", FOLD_MODULES),
    ("bnfold.exact", FOLD_MODULES),
    ("bnfold.graph", {"bnfold.modelio.write"}),
    ("bnfold.fold", {"onnxruntime", "click"}),
])
def test_importing_does_not_load_banned_modules(module, banned):
    """The same rule at run time, through every import the module makes."""
    code = f"import sys, {module}; print(sorted(m for m in {sorted(banned)!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "[]"


def test_ruff_config_bans_onnxruntime_and_click(tmp_path):
    """pyproject's ruff configuration flags a library module importing onnxruntime or click."""
    ruff = shutil.which("ruff") or (Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "bnfold").mkdir()
    (tmp_path / "bnfold" / "fold.py").write_text("import onnxruntime\nimport click\n\nprint(onnxruntime, click)\n")
    (tmp_path / "bnfold" / "runner.py").write_text("import onnxruntime\n\nprint(onnxruntime)\n")
    (tmp_path / "bnfold" / "cli.py").write_text("import click\n\nprint(click)\n")
    out = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise", "bnfold"],
                         capture_output=True, text=True, cwd=tmp_path)
    flagged = sorted(line.split(":")[0] + ":" + line.split(":")[1] for line in out.stdout.splitlines()
                     if "TID251" in line)
    assert flagged == ["bnfold/fold.py:1", "bnfold/fold.py:2"], out.stdout + out.stderr
