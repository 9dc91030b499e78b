"""The embedded default corpus: English prose that ships with every Python installation.

With no `--data_path`, minimind_fast trains on text taken from the running interpreter, so the
main job needs no download. Three sources, in this fixed order:

1. pydoc's topic texts (`pydoc_data.topics.topics`: the language reference behind `help()`),
2. the docstrings of the standard-library modules and of their public classes, functions,
   methods and properties (C-implemented ones included, which is why modules are imported),
3. the comment blocks of the standard-library sources (prose written by the core developers,
   read with `tokenize`, nothing imported).

Docstrings alone come to under 2 MB, so the comment blocks (source 3) top the corpus up to
several MB; every piece is deduplicated, pieces under `MIN_DOC_CHARS` are dropped, and the
order is deterministic (sorted module names, sorted attribute names, sorted file walk).

Importing ~500 modules has side effects a library must not inflict on its caller (prints,
warnings, `.pyc` writes, a module that hangs), so collection runs in a child interpreter
(`python -I -S -B this_file --collect OUT`) with stdout/stderr captured, a per-import alarm, and a
hard timeout; modules with known side effects (`antigravity`, `this`, `idlelib`, tkinter, ...) and
test packages are never imported. The result is written once as JSONL (`{"text": ...}` per line,
MiniMind's pretraining format) to the cache directory, atomically (temp file + `os.replace`),
keyed by the Python version, and reused afterwards.

The child runs this file as a plain script, so it imports only the standard library (and,
when imported as part of the package, minimind_fast.paths).
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import pkgutil
import platform
import signal
import subprocess
import sys
import sysconfig
import tempfile
import tokenize
import warnings
from pathlib import Path
from pydoc_data.topics import topics as PYDOC_TOPICS

if __package__:  # imported as minimind_fast.corpus (the child runs this file as a plain script)
    from .paths import default_cache_dir

CORPUS_FORMAT_VERSION = 2
MIN_DOC_CHARS = 64
"""Pieces shorter than this (after `inspect.cleandoc`/stripping), or with fewer than half as many
letters (rulers such as `# ------`), carry too little prose to keep."""

MIN_CORPUS_BYTES = 1_000_000
"""A built corpus smaller than this means collection went wrong; the build fails loudly."""

# Never imported: they open browsers/windows, print, write files, or are test suites.
SKIP_MODULES = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "test",
        "readline",
        "pydoc_data",
        "site",
        "msilib",
        "winreg",
        "winsound",
        "msvcrt",
        "nt",
    }
)
SKIP_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
SKIP_SOURCE_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
    }
)
IMPORT_TIMEOUT_S = 10
BUILD_TIMEOUT_S = 600


def default_corpus_name() -> str:
    """File name of the default corpus: keyed by interpreter and Python version (its source)."""
    version = ".".join(str(v) for v in sys.version_info[:3])
    implementation = platform.python_implementation().lower()
    return f"default_corpus-{implementation}{version}-v{CORPUS_FORMAT_VERSION}.jsonl"


def build_default_corpus(out_path: Path | None = None) -> Path:
    """Write the default corpus as JSONL once and return its path; reuse an existing file.

    out_path: where to write it (default: `default_cache_dir() / default_corpus_name()`).
    Raises RuntimeError (with the child's last stderr lines) if collection fails.
    """
    if out_path is None:
        out_path = default_cache_dir() / default_corpus_name()
    out_path = Path(out_path)
    if out_path.is_file() and out_path.stat().st_size > 0:
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        command = [
            sys.executable,
            "-I",
            "-S",
            "-B",
            str(Path(__file__).resolve()),
            "--collect",
            tmp_name,
        ]
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"building the default corpus took over {BUILD_TIMEOUT_S} s and was "
                "stopped. Pass your own data with --data_path instead."
            ) from None
        size = os.path.getsize(tmp_name)
        if result.returncode != 0 or size < MIN_CORPUS_BYTES:
            tail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"building the default corpus failed (exit {result.returncode}, {size} bytes "
                f"written): {' | '.join(tail) or 'no error output'}. "
                "Pass your own data with --data_path instead."
            )
        os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; the corpus is shareable
        os.replace(tmp_name, out_path)  # atomic: readers see no file or the whole file
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return out_path


# ----------------------------------------------------------------------------------------------
# Everything below runs in the child interpreter.


def _skip_name(dotted: str) -> bool:
    parts = dotted.split(".")
    return (
        parts[0] in SKIP_MODULES
        or parts[0].startswith("_")
        or any(p in SKIP_PARTS or p.startswith("_") for p in parts[1:])
    )


def _import(name: str):
    """Import `name` under an alarm; None if it fails, hangs or is not pure stdlib."""

    def on_alarm(signum, frame):
        raise TimeoutError(name)

    has_alarm = hasattr(signal, "SIGALRM")
    if has_alarm:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(IMPORT_TIMEOUT_S)
    try:
        return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - any failure (SystemExit included) just skips it
        return None
    finally:
        if has_alarm:
            signal.alarm(0)


def _module_names() -> list[str]:
    """Sorted public stdlib module names, submodules of packages included."""
    names = set()
    for top in sorted(sys.stdlib_module_names):
        if _skip_name(top):
            continue
        module = _import(top)
        if module is None:
            continue
        names.add(top)
        if hasattr(module, "__path__"):
            try:
                infos = list(
                    pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda n: None)
                )
            except BaseException:  # noqa: BLE001
                continue
            names.update(info.name for info in infos if not _skip_name(info.name))
    return sorted(names)


def _public_members(value) -> list:
    """The public routines and properties defined on class `value`, by name."""
    members = vars(value)
    kinds = (property, classmethod, staticmethod)
    return [
        members[m]
        for m in sorted(members)
        if not m.startswith("_")
        and (inspect.isroutine(members[m]) or isinstance(members[m], kinds))
    ]


def _docstrings(module) -> list[str]:
    """Docstrings of a module and of its public classes/functions/methods/properties, in order."""
    objects = [module]
    for attr in sorted(dir(module)):
        if attr.startswith("_"):
            continue
        try:
            value = getattr(module, attr)
        except BaseException:  # noqa: BLE001
            continue
        if inspect.isclass(value) or inspect.isroutine(value):
            objects.append(value)
        if inspect.isclass(value):
            objects.extend(_public_members(value))
    docs = []
    for obj in objects:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str):
            docs.append(inspect.cleandoc(doc))
    return docs


def _comment_blocks(path: Path) -> list[str]:
    """Runs of consecutive `#` comment lines of one source file, each joined into a paragraph."""
    blocks, current, last_line = [], [], -2
    try:
        source = path.read_bytes()
        for token in tokenize.tokenize(io.BytesIO(source).readline):
            if token.type != tokenize.COMMENT:
                continue
            text = token.string.lstrip("#").strip()
            if token.start[0] != last_line + 1 and current:
                blocks.append(" ".join(current))
                current = []
            if text and not text.startswith("!") and "-*-" not in text:
                current.append(text)
            last_line = token.start[0]
    except (OSError, SyntaxError, tokenize.TokenError, UnicodeDecodeError):
        pass
    if current:
        blocks.append(" ".join(current))
    return blocks


def _source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_SOURCE_DIRS)
        files.extend(Path(directory) / n for n in sorted(names) if n.endswith(".py"))
    return files


def _collect(out_file) -> int:
    """Write every kept piece as one JSONL line; returns the number of documents."""
    warnings.simplefilter("ignore")
    seen: set[str] = set()
    count = 0

    def emit(text: str) -> None:
        nonlocal count
        text = text.strip()
        letters = sum(map(str.isalpha, text))
        if len(text) < MIN_DOC_CHARS or text in seen or letters < MIN_DOC_CHARS // 2:
            return
        seen.add(text)
        out_file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        count += 1

    for topic in sorted(PYDOC_TOPICS):
        emit(PYDOC_TOPICS[topic])
    for name in _module_names():
        module = _import(name)
        if module is not None:
            for doc in _docstrings(module):
                emit(doc)
    for path in _source_files():
        for block in _comment_blocks(path):
            emit(block)
    return count


def _child_main(out_path: str) -> int:
    # Imports may print; keep the file handle private and the real stdout silent.
    sys.stdout = io.StringIO()
    with open(out_path, "w", encoding="utf-8") as out_file:
        count = _collect(out_file)
    sys.stderr.write(f"{count} documents\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--collect":
        sys.exit(_child_main(sys.argv[2]))
    print(build_default_corpus())
