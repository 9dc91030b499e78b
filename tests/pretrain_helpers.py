"""Shared fixtures of the training-loop tests: a tiny synthetic corpus, a tiny tokenizer, the flags
of a tiny model (hidden 32, 2 layers, seq 32) so a pretrain run takes seconds on 2 cores, a
trainer subprocess whose output is read line by line, and checks of a run directory."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minimind_fast import checkpoints, pretrain
from minimind_fast.data.tokenizer import load_tokenizer
from minimind_fast.interop import load_weights
from minimind_fast.train import resume

WORDS = (
    "the model reads a token and writes the next one while the loss falls slowly over many steps "
    "because gradients point downhill so small networks learn short patterns from plain english "
    "text every document starts with a marker and ends with another marker"
).split()
VOCAB_SIZE = 320
REPO = Path(__file__).resolve().parents[1]
TEMP_NAMES = (".tmp-", ".trash-", ".write-test")


def write_corpus(path: Path, num_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(num_docs):
            sentences = []
            for _ in range(rng.randint(2, 6)):
                start = rng.randrange(len(WORDS) - 8)
                sentences.append(
                    " ".join(WORDS[start : start + rng.randint(4, 8)]).capitalize() + "."
                )
            handle.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def make_assets(root: Path) -> dict[str, Path]:
    """Corpus + tokenizer under `root` (the token cache goes to $MINIMIND_FAST_CACHE)."""
    from minimind_fast.data.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    data = write_corpus(root / "tiny.jsonl")
    tokenizer = train_tokenizer([data], VOCAB_SIZE, root / "tokenizer")
    return {"data": data, "tokenizer": tokenizer, "cache": root / "cache"}


def tiny_flags(assets: dict[str, Path], save_dir: Path, **overrides) -> list[str]:
    """argv for minimind_fast.pretrain: a tiny model on the tiny corpus; overrides win."""
    flags = dict(
        preset="demo",
        hidden_size=32,
        num_hidden_layers=2,
        vocab_size=VOCAB_SIZE,
        max_seq_len=32,
        batch_size=4,
        accumulation_steps=1,
        learning_rate=1e-2,
        warmup_steps=2,
        data_path=assets["data"],
        tokenizer_path=assets["tokenizer"],
        save_dir=save_dir,
        log_interval=1,
        save_interval=0,
        eval_interval=0,
        sample_tokens=0,
        device="cpu",
        seed=3,
    )
    flags.update(overrides)
    argv = []
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny corpus and tokenizer; token caches go to a temp $MINIMIND_FAST_CACHE, not
    ~/.cache."""
    root = tmp_path_factory.mktemp("pretrain_assets")
    previous = os.environ.get("MINIMIND_FAST_CACHE")
    os.environ["MINIMIND_FAST_CACHE"] = str(root / "cache")
    try:
        yield make_assets(root)
    finally:
        if previous is None:
            os.environ.pop("MINIMIND_FAST_CACHE", None)
        else:
            os.environ["MINIMIND_FAST_CACHE"] = previous


def run(argv) -> int:
    """pretrain.main in this process; the exit code (2 for CLI errors)."""
    try:
        return pretrain.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def final_state(run_dir) -> dict:
    """The resume state of the newest healthy checkpoint of `run_dir`."""
    return resume.load_resume_state(checkpoints.latest_checkpoint(run_dir))


class Child:
    """`python -m minimind_fast.pretrain argv` with its output collected line by line."""

    live: list["Child"] = []  # killed at the end of the test, should an assertion leave one running

    def __init__(self, argv, module: str = "minimind_fast.pretrain", preexec_fn=None):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *map(str, argv)],
            env=env,
            preexec_fn=preexec_fn,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(
            target=lambda: self.lines.extend(self.proc.stdout), daemon=True
        )
        self.reader.start()
        Child.live.append(self)

    def output(self) -> str:
        return "".join(self.lines)

    def resumed_step(self) -> int:
        found = re.search(r"resumed \S+ at step (\d+)", self.output())
        return int(found.group(1)) if found else 0

    def training(self) -> bool:
        return any(line.startswith("model ") for line in self.lines)

    def logged_step(self) -> int:
        steps = re.findall(r"step (\d+)/\d+ \|", self.output())
        return int(steps[-1]) if steps else -1

    def wait_until(self, condition, timeout: float = 60.0, poll: float = 0.0002) -> bool:
        """True once condition() holds while the process still runs; False if it exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if condition():
                return True
            time.sleep(poll)
        raise AssertionError(f"timed out waiting; output so far:\n{self.output()[-3000:]}")

    def kill(self, signum: int = signal.SIGKILL) -> bool:
        """Send `signum` (SIGKILL); True if it landed on a running process."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
        if signum != signal.SIGKILL:
            return True
        code = self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return code == -signal.SIGKILL

    def finish(self, timeout: float = 180) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def debris(run_dir: Path) -> list[Path]:
    return [
        p for p in run_dir.rglob("*") if p.name.startswith(TEMP_NAMES) or p.name.endswith(".tmp")
    ]


def check_every_complete_checkpoint_loads(run_dir: Path) -> list[int]:
    """Every checkpoint marked complete reads back whole and self-consistent; returns their
    steps."""
    root = run_dir / checkpoints.CHECKPOINTS_DIR
    steps, config = [], None
    if root.is_dir():  # a step_* directory only ever appears by renaming a complete temp directory
        unmarked = [
            p.name
            for p in root.iterdir()
            if p.name.startswith("step_") and not (p / checkpoints.MARKER).is_file()
        ]
        assert not unmarked, unmarked
    for ckpt in checkpoints.list_checkpoints(run_dir, healthy_only=False):
        state = resume.load_resume_state(ckpt)
        step = int(ckpt.name.split("_")[1])
        assert state["train_state"]["step"] == step, ckpt
        config, weights = load_weights(ckpt)  # model.safetensors, validated against its config.json
        _, pth = load_weights(ckpt / "pretrain_32.pth", config)
        for key, value in weights.items():
            assert torch.equal(pth[key], value), (ckpt, key)
            assert torch.equal(state["model"][key].half(), value), (ckpt, key)
        assert set(state["optimizer"]["state"]) and len(state["rng"]) == 1
        load_tokenizer(ckpt)
        steps.append(step)
    if (
        run_dir / "pretrain_32.pth"
    ).exists():  # the run directory's MiniMind mirror is always whole
        load_weights(run_dir / "pretrain_32.pth", config)
    if (run_dir / "tokenizer.json").exists():
        load_tokenizer(run_dir)
    return steps


@pytest.fixture
def no_orphans():
    yield
    for child in Child.live:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
    Child.live.clear()
