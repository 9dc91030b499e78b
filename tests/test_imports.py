"""The package's imports run one way, read from the source with `ast` (nothing is imported).

Layers, lowest first (a module may import its own layer or lower ones, never a higher one):

    0  constants, paths, compat, fileio, dtypes, config          shared facts and helpers
    1  kernels                                                    Triton launchers
    2  ops                                                        registered ops, the dispatcher
    3  nn, layers, moe, model, losses, sampling                   the model
    4  data, weights, checkpoints, corpus, corpus_sft, interop    files in and out
    5  inference                                                  a model ready to generate
    6  train                                                      the trainer's parts
    7  pretrain, sft, generate, export, tokenizer                 entry points

Within the package no module-level cycle exists, and function-level imports are kept for optional
dependencies only (triton behind the kernels, the compiled extension, transformers, trackers,
matplotlib, and platform-specific stdlib modules).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    ("constants", "paths", "compat", "fileio", "dtypes", "config"),
    ("kernels",),
    ("ops",),
    ("nn", "layers", "moe", "model", "losses", "sampling"),
    ("data", "weights", "checkpoints", "corpus", "corpus_sft", "interop"),
    ("inference",),
    ("train",),
    ("pretrain", "sft", "generate", "export", "tokenizer"),
]
OPTIONAL = (
    "triton",
    "transformers",
    "wandb",
    "swanlab",
    "matplotlib",
    "torch.utils.tensorboard",
    "minimind_fast.kernels",
    "minimind_fast._C",
    "resource",
    "pydoc_data",
)


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = (
        ("minimind_fast",) + relative.parts if relative.parts[0] == "kernels" else relative.parts
    )
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def sources() -> dict[str, Path]:
    files = list((REPO / "minimind_fast").rglob("*.py")) + list((REPO / "kernels").rglob("*.py"))
    return {module_name(path): path for path in files}


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at function level?) for every import statement of a file; `from X import
    y` counts as importing X.y when X.y is a module of the package, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = sources()
    found = []

    def visit(node, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    compiled = alias.name == "_C"  # the extension module has no .py source
                    found.append((target if target in known or compiled else base, nested))
            else:
                visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def layer_of(name: str) -> int:
    top = name.split(".")[1] if name.count(".") else ""
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{name} belongs to no layer; add it to LAYERS in {__file__}")


@functools.lru_cache(maxsize=None)
def package_imports() -> dict[str, list[tuple[str, bool]]]:
    return {
        name: [
            (target, nested)
            for target, nested in imports(name, path)
            if target.startswith("minimind_fast.") or target == "minimind_fast" or nested
        ]
        for name, path in sources().items()
        if name != "minimind_fast"
    }


@pytest.mark.parametrize("name", sorted(n for n in sources() if n != "minimind_fast"))
def test_imports_only_its_own_layer_or_lower(name):
    for target, _ in package_imports()[name]:
        if not target.startswith("minimind_fast.") or target.startswith("minimind_fast._C"):
            continue
        assert layer_of(target) <= layer_of(name), (
            f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        )


def test_function_level_imports_are_for_optional_dependencies_only():
    offenders = [
        f"{name} imports {target} inside a function"
        for name, found in package_imports().items()
        for target, nested in found
        if nested and not any(target == o or target.startswith(o + ".") for o in OPTIONAL)
    ]
    assert not offenders, offenders


def test_no_module_level_cycles():
    graph = {
        name: {t for t, nested in found if not nested and t in sources()}
        for name, found in package_imports().items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if target.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(target) == 1:
                cycle = trail[trail.index(target) :] if target in trail else trail
                raise AssertionError(" -> ".join(cycle + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_top_level_names_are_lazy():
    import subprocess
    import sys

    code = "import sys, minimind_fast.ops; print('minimind_fast.model' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False", "importing minimind_fast.ops must not load the model"
