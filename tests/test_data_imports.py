"""Imports of the data side (data/, tokenizer, corpus) run one way: no cycles, no function-level
imports of the package's own modules, and every entry point imports on its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minimind_fast"
DATA_SIDE = sorted(PACKAGE.glob("data/*.py")) + [PACKAGE / "tokenizer.py", PACKAGE / "corpus.py"]
OPTIONAL = {"triton", "transformers", "wandb", "swanlab", "matplotlib"}  # may load late


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported minimind_fast module, imported inside a function?) for each import in `path`.
    `from .x import name` counts as importing x.name when that is a module, else x."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    functions = [f for f in ast.walk(tree) if isinstance(f, kinds)]
    nested = {id(node) for fn in functions for node in ast.walk(fn) if node is not fn}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("minimind_fast"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                target = sub if is_module else base
                found.append((target, id(node) in nested))
        elif isinstance(node, ast.Import):
            found += [
                (a.name, id(node) in nested)
                for a in node.names
                if a.name.startswith("minimind_fast")
            ]
    return found


def graph() -> dict[str, set[str]]:
    """Edges module -> imported modules. Importing a.b.c runs a.b's __init__ first, so a module
    also depends on the packages it imports from, except its own (a package's __init__ importing
    its submodules, which import their siblings, is no cycle)."""
    edges: dict[str, set[str]] = {}
    for path in DATA_SIDE:
        name = module_name(path)
        own = name.split(".")
        own = {".".join(own[:i]) for i in range(1, len(own) + 1)}
        targets = set()
        for target, _ in package_imports(path):
            parts = target.split(".")
            targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        edges[name] = targets - own
    return edges


def test_no_function_level_imports_of_the_package():
    late = [(module_name(p), t) for p in DATA_SIDE for t, nested in package_imports(p) if nested]
    assert not late, f"function-level imports hide a dependency: {late}"


def test_function_level_imports_only_for_optional_dependencies():
    late = []
    for path in DATA_SIDE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." * node.level + (node.module or "")]
                else:
                    continue
                late += [(module_name(path), n) for n in names if n.split(".")[0] not in OPTIONAL]
    assert not late, f"imports inside functions: {late}"


def test_no_import_cycles():
    edges = graph()

    def reach(start):
        seen, stack = set(), [start]
        while stack:
            for nxt in edges.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    cycles = sorted(m for m in edges if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize(
    "module",
    [
        "minimind_fast.tokenizer",
        "minimind_fast.data.reader",
        "minimind_fast.data",
        "minimind_fast.corpus",
    ],
)
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_tokenizer_cli_and_corpus_script_still_run():
    result = subprocess.run(
        [sys.executable, "-m", "minimind_fast.tokenizer", "--help"],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        timeout=300,
    )
    assert result.returncode == 0 and "--vocab_size" in result.stdout, result.stderr[-2000:]
    # the corpus collector's child runs corpus.py as a plain script, outside the package
    script = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-B",
            "-c",
            f"import runpy; runpy.run_path({str(PACKAGE / 'corpus.py')!r})",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        input="",
    )
    assert script.returncode == 0 and "Error" not in script.stderr, script.stderr
