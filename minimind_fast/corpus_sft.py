"""The default SFT set: questions about the Python standard library, answered from its own docs.

With no `--data_path`, SFT trains on conversations built from the running interpreter, so it
needs no download (as the default pretraining corpus in corpus.py). Subjects, in this order:

1. the public functions and classes of a few built-in C modules (`builtins`, `math`, ...),
   read from their docstrings (these modules import without side effects),
2. pydoc's topics (`pydoc_data.topics`: the language reference behind `help()`),
3. the modules, public functions, classes and methods of the standard library's Python sources,
   read with `ast` (nothing is imported or run).

Each subject becomes one conversation: a question from a few phrasing templates ("What does
`json.dumps` do?", "What does the pydoc topic `assert` cover?") and, as the answer, the first
paragraph of its docstring (or of the topic's text, after its title). Answers that are too
short, too long, code, or already used are dropped, so every answer occurs once; a fixed share
of conversations starts with a system prompt. Choices hash the subject or the answer, so the
set is the same on every run of one Python version.

The held-out split goes by answer (hence by question): VAL_PERCENT of the answers, chosen by
hash, form val.jsonl, the rest train.jsonl; no question or answer of one file is in the other.
The set is written once, as MiniMind's SFT JSONL, into a directory under the cache directory
keyed by the Python version and SFT_SET_FORMAT_VERSION (temp directory renamed into place).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .corpus import SKIP_MODULES, SKIP_SOURCE_DIRS
from .data.errors import writing
from .paths import default_cache_dir

SFT_SET_FORMAT_VERSION = 1
VAL_PERCENT = 5
SYSTEM_PERCENT = 20
MIN_ANSWER_CHARS = 24
MAX_ANSWER_CHARS = 400
SYSTEM_PROMPT = "You are a concise assistant who explains the Python standard library."
C_MODULES = (
    "builtins",
    "math",
    "cmath",
    "itertools",
    "operator",
    "binascii",
    "zlib",
    "unicodedata",
    "time",
    "sys",
    "gc",
)
"""Built-in modules read by import: they have no Python source, and importing them is inert."""

QUESTIONS = {
    "function": (
        "What does `{}` do?",
        "Explain what `{}` does.",
        "What is `{}` used for?",
        "In Python, what does `{}` do?",
    ),
    "method": ("What does the method `{}` do?", "Explain the method `{}`.", "What is `{}` for?"),
    "class": ("What is the class `{}`?", "What is `{}` in Python?", "Describe the class `{}`."),
    "module": (
        "What is the `{}` module for?",
        "What does the Python module `{}` provide?",
        "Describe the module `{}`.",
    ),
    "topic": ("What does the pydoc topic `{}` cover?", "Summarize the Python help topic `{}`."),
}
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*-+>.*)?$")


@dataclass(frozen=True)
class SFTSet:
    """The default set's files: train.jsonl and val.jsonl in `directory`."""

    directory: Path

    @property
    def train(self) -> Path:
        return self.directory / "train.jsonl"

    @property
    def val(self) -> Path:
        return self.directory / "val.jsonl"


def _hash_percent(text: str, salt: str = "") -> int:
    """A stable number in [0, 100) for `text` (the same on every machine and run)."""
    digest = hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100


def first_paragraph(doc: str) -> str | None:
    """The docstring's first prose paragraph on one line, or None when there is none to use
    (a leading call signature such as `int(x) -> integer` is passed over)."""
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if not lines or all(_SIGNATURE.match(line) or set(line) <= set("-=") for line in lines):
            continue
        text = " ".join(" ".join(lines).split())
        if text.endswith(":"):  # the paragraph introduces a list or an example
            text = text[:-1] + "."
        return text
    return None


def _usable(answer: str | None) -> bool:
    return (
        answer is not None
        and MIN_ANSWER_CHARS <= len(answer) <= MAX_ANSWER_CHARS
        and ">>>" not in answer
        and sum(map(str.isalpha, answer)) * 2 >= len(answer)
    )


def _c_module_subjects():
    for module_name in C_MODULES:
        module = importlib.import_module(module_name)
        for attr in sorted(vars(module)):
            value = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isclass(value) or inspect.isroutine(value)):
                continue
            name = attr if module_name == "builtins" else f"{module_name}.{attr}"
            kind = "class" if inspect.isclass(value) else "function"
            yield kind, name, value.__doc__ if isinstance(value.__doc__, str) else ""


def _topic_subjects():
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        title, _, body = topics[topic].partition("\n")
        body = body.lstrip("*=\n")  # the title's underline
        for paragraph in body.split("\n\n"):
            if (
                paragraph.strip()
                and not paragraph.startswith(" ")
                and not re.match(r"(New|Added|Changed|Deprecated) in version", paragraph)
            ):
                yield "topic", topic, f"{title.strip()}. {paragraph}"
                break


def _module_name(root: Path, path: Path) -> str | None:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or parts[0] in SKIP_MODULES or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def _is_property(node) -> bool:
    return any(
        isinstance(d, ast.Name)
        and d.id == "property"
        or isinstance(d, ast.Attribute)
        and d.attr in ("setter", "getter", "deleter")
        for d in node.decorator_list
    )


def _source_subjects():
    root = Path(sysconfig.get_paths()["stdlib"])
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_SOURCE_DIRS)
        for file_name in sorted(n for n in names if n.endswith(".py")):
            path = Path(directory) / file_name
            module = _module_name(root, path)
            try:
                tree = ast.parse(path.read_bytes()) if module else None
            except (OSError, SyntaxError, ValueError):
                tree = None
            if tree is None:
                continue
            yield "module", module, ast.get_docstring(tree) or ""
            for node in tree.body:
                if not isinstance(node, definitions) or node.name.startswith("_"):
                    continue
                is_class = isinstance(node, ast.ClassDef)
                name = f"{module}.{node.name}"
                yield ("class" if is_class else "function"), name, ast.get_docstring(node) or ""
                for member in node.body if is_class else ():
                    if (
                        isinstance(member, definitions[:2])
                        and not member.name.startswith("_")
                        and not _is_property(member)
                    ):
                        yield "method", f"{name}.{member.name}", ast.get_docstring(member) or ""


def collect_pairs() -> list[tuple[str, str, str]]:
    """(kind, name, answer) of every subject kept, in collection order; names and answers unique."""
    names, answers, pairs = set(), set(), []
    for source in (_c_module_subjects(), _topic_subjects(), _source_subjects()):
        for kind, name, doc in source:
            answer = first_paragraph(doc) if doc else None
            key = answer.lower() if answer else None
            if name in names or not _usable(answer) or key in answers:
                continue
            names.add(name)
            answers.add(key)
            pairs.append((kind, name, answer))
    return pairs


def conversation(kind: str, name: str, answer: str) -> dict:
    """The SFT record of one subject: {"conversations": [system?, user, assistant]}."""
    templates = QUESTIONS[kind]
    question = templates[_hash_percent(name, "question") % len(templates)].format(name)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if _hash_percent(name, "system") < SYSTEM_PERCENT:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return {"conversations": messages}


def is_validation(answer: str) -> bool:
    """Whether the conversation with this answer is held out (VAL_PERCENT of answers)."""
    return _hash_percent(answer.lower(), "split") < VAL_PERCENT


def default_sft_set_name() -> str:
    """Directory name of the default set: keyed by interpreter, Python version, format."""
    version = ".".join(str(v) for v in sys.version_info[:3])
    implementation = platform.python_implementation().lower()
    return f"default_sft-{implementation}{version}-v{SFT_SET_FORMAT_VERSION}"


def _write_set(directory: Path) -> dict:
    counts = {"train": 0, "val": 0}
    with (
        open(directory / "train.jsonl", "w", encoding="utf-8") as train,
        open(directory / "val.jsonl", "w", encoding="utf-8") as val,
    ):
        for kind, name, answer in collect_pairs():
            split = "val" if is_validation(answer) else "train"
            line = json.dumps(conversation(kind, name, answer), ensure_ascii=False) + "\n"
            (val if split == "val" else train).write(line)
            counts[split] += 1
    meta = {"format_version": SFT_SET_FORMAT_VERSION, "python": sys.version, **counts}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def build_default_sft_set(out_dir=None) -> SFTSet:
    """Write the default SFT set once and return its files; reuse an existing build.

    out_dir: the set's directory (default: `default_cache_dir() / default_sft_set_name()`).
    Raises DataError when the set cannot be written (a full disk, no permission).
    """
    final = Path(out_dir) if out_dir is not None else default_cache_dir() / default_sft_set_name()
    if (final / "meta.json").is_file():
        return SFTSet(final)
    what = "the default SFT set"
    with writing(final.parent, what):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        with writing(final.parent, what):
            meta = _write_set(tmp)
        if min(meta["train"], meta["val"]) == 0:
            raise RuntimeError(
                f"the default SFT set came out empty ({meta['train']} training, "
                f"{meta['val']} held-out conversations) on Python "
                f"{platform.python_version()}; pass your own data with --data_path"
            )
        with writing(final.parent, what):
            os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the set is shareable
            try:
                os.rename(tmp, final)  # atomic: readers see no set or the whole set
            except OSError:
                if not (final / "meta.json").is_file():  # tolerate only losing a race
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SFTSet(final)


if __name__ == "__main__":
    built = build_default_sft_set()
    print(f"{built.train} and {built.val}")
