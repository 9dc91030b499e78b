"""torch.compile of the training step: whether (`--use_compile auto`), how, and at what cost.

`auto` trains its first steps eagerly and times them; after the second (the first carries
first-call costs) it compiles when the time compiling should save over the rest of the run
exceeds the time it should take:

    steps_left * eager_step_s * (1 - 1 / speedup)  >  compile_s * shapes

- eager_step_s: the measured second step;
- compile_s, speedup: this machine's calibration record of the same model, micro-batch shape,
  dtype, device and torch (`<cache dir>/compile_records.json`), which every compiling run
  writes; without one, first guesses (FIRST_GUESS) that the first compile replaces;
- shapes: the static shapes the run will see (a short last micro-batch of an epoch is a second).

Compiling warms up on the run's first micro-batch (compile + call, a timed compiled call, a timed
eager call), records what it measured, and under auto trains eagerly after all if the compiled
call was not faster or compiling failed. Rank 0 decides and broadcasts: all ranks compile or none
does. The choice is written into the flags (use_compile 0/1), so a resumed run keeps it; 0 and 1
keep their meaning (1 compiles before the first step). bench/RESULTS.md has measured values.

Inductor keeps its FX-graph, AOT-autograd and autotune caches on disk; they go to
`<cache dir>/inductor` (unless $TORCHINDUCTOR_CACHE_DIR names another place), so a second run of
the same model compiles mostly from cache.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..fileio import write_json_atomic
from ..paths import default_cache_dir
from . import distributed

RECORDS_FILE = "compile_records.json"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@dataclass(frozen=True)
class Estimate:
    """Seconds to compile (first call minus a compiled call); speedup = eager / compiled time."""
    compile_s: float
    speedup: float
    measured: bool  # from this machine's record (else the first guess)


# Used until this machine has compiled the model once: a cold compile of a MiniMind-size model
# with a modest gain, so that only runs long enough to repay it on any machine compile untried.
FIRST_GUESS = Estimate(compile_s=60.0, speedup=1.2, measured=False)


@dataclass(frozen=True)
class Decision:
    compile: bool
    reason: str


def decide(setting, steps_left: int, eager_step_s: float, estimate: Estimate,
           compiles: int = 1) -> Decision:
    """Whether to compile: `setting` 0/1 as given; "auto" by the rule in the module docstring."""
    if setting in (0, 1):
        return Decision(bool(setting), f"--use_compile {setting}")
    saving = steps_left * eager_step_s * (1.0 - 1.0 / max(estimate.speedup, 1e-9))
    cost = estimate.compile_s * compiles
    source = "measured here" if estimate.measured else "first guess: not measured here yet"
    shapes = f" x {compiles} shapes" if compiles > 1 else ""
    why = (f"auto: {steps_left} steps left x {eager_step_s:.3g} s x "
           f"(1 - 1/{estimate.speedup:.2f}) = "
           f"{saving:.0f} s saved {'>' if saving > cost else '<='} {estimate.compile_s:.0f} s"
           f"{shapes} to compile ({source})")
    return Decision(saving > cost, why)


def shapes_in_run(rows_left_in_epoch: int, batch_size: int, micro_batches_left: int) -> int:
    """Static shapes the compiled model will be called with: the micro-batch, and a short last
    one if the run reaches the end of an epoch whose rows do not divide into micro-batches."""
    short = rows_left_in_epoch % batch_size != 0
    return 1 + int(short and micro_batches_left >= -(-rows_left_in_epoch // batch_size))


# ---- calibration record --------------------------------------------------------------------


def records_path() -> Path:
    return default_cache_dir() / RECORDS_FILE


def signature(config, batch: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
              world_size: int, grad_checkpointing: bool) -> str:
    """Key of a calibration record: what decides compile time and step speed."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu x{torch.get_num_threads()} threads"
    what = {"torch": torch.__version__, "device": where, "world_size": world_size,
            "config": config.to_dict(), "batch": {k: list(v.shape) for k, v in batch.items()},
            "dtype": str(dtype), "grad_checkpointing": bool(grad_checkpointing)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_records(path: Path) -> dict[str, Any]:
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: decide from the first guess
        return {}
    return records if isinstance(records, dict) else {}


def estimate_for(records: dict[str, Any], key: str) -> Estimate:
    entry = records.get(key)
    try:
        return Estimate(float(entry["compile_s"]), float(entry["speedup"]), True)
    except (TypeError, KeyError, ValueError):
        return FIRST_GUESS


def save_record(path: Path, key: str, compile_s: float, speedup: float) -> None:
    """Add or replace one record; a write that fails only loses the record (warned, not fatal).
    The latest compile time is kept: after a first (cold) compile it overstates the next one,
    which finds inductor's cache warm, so auto errs towards eager until a warm compile is timed."""
    records = load_records(path)
    records[key] = {"compile_s": round(compile_s, 3), "speedup": round(speedup, 4),
                    "cold": key not in records, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, records)
    except OSError as error:
        print(f"warning: could not write the compile record {path}: {error}", flush=True)


def _torch_default_inductor_dir() -> str:
    """Where inductor caches by default: {tempdir}/torchinductor_{user}. Importing torch._dynamo
    writes it into the environment, so that value does not mean that the user chose it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")


def use_inductor_cache() -> str:
    """Point inductor's on-disk caches (read at each use) at <cache dir>/inductor, unless
    $TORCHINDUCTOR_CACHE_DIR names a directory of the user's choosing."""
    current = os.environ.get(INDUCTOR_CACHE_ENV)
    if not current or os.path.abspath(current) == _torch_default_inductor_dir():
        os.environ[INDUCTOR_CACHE_ENV] = str(default_cache_dir() / "inductor")
    return os.environ[INDUCTOR_CACHE_ENV]


# ---- measuring --------------------------------------------------------------------------------


def first_batch(loader, rows: int) -> dict[str, torch.Tensor]:
    """The first `rows` rows of the dataset, collated as the loader does: the shapes and keys
    of the run's micro-batches, read without touching the sampler's position."""
    dataset = loader.dataset
    return loader.collate_fn([dataset[i] for i in range(min(rows, len(dataset)))])


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _forward_backward(model, batch: dict[str, torch.Tensor], autocast, device: torch.device):
    """One forward + backward whose gradients are returned and dropped (the parameters' .grad
    and the RNG streams of the run are left as they were)."""
    def run():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with autocast:
                out = model(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                            segment_ids=None if batch.get("segment_ids") is None
                            else batch["segment_ids"].to(device))
            params = [p for p in model.parameters() if p.requires_grad]
            torch.autograd.grad(out.loss + out.aux_loss, params, allow_unused=True)
    return run


def compile_model(model, ddp, backend: str = "inductor"):
    """The compiled training module. fullgraph: the whole model is one graph, MoE included (its
    expert computation runs grouped under compile, with no host read). Under DDP the compile
    wraps the DDP module, which keeps dynamo's DDPOptimizer (the graph split at bucket
    boundaries, so gradient all-reduce overlaps the backward); DDP's own forward (its logger and
    `_inside_ddp_forward`, which dynamo skips on purpose) is not traceable, so fullgraph would
    fail there: the model inside is still captured as one graph."""
    use_inductor_cache()
    if ddp is not None:
        return torch.compile(ddp, dynamic=False, backend=backend)
    return torch.compile(model, fullgraph=True, dynamic=False, backend=backend)


@dataclass
class CompileReport:
    """What the trainer logs about compiling."""
    decision: Decision
    compiled: bool = False
    compile_s: Optional[float] = None  # first compiled call minus a compiled call
    eager_s: Optional[float] = None  # forward + backward of one micro-batch, eager
    compiled_s: Optional[float] = None  # ... compiled
    note: str = ""

    def line(self) -> str:
        text = f"compile: {'on' if self.compiled else 'off'} ({self.decision.reason})"
        if self.compile_s is not None:
            text += f"; compiled in {self.compile_s:.1f} s"
        if self.compiled_s and self.eager_s:
            text += (f", forward+backward {self.compiled_s:.3g} s vs {self.eager_s:.3g} s eager "
                     f"({self.eager_s / self.compiled_s:.2f}x)")
        return text + (f"; {self.note}" if self.note else "")


def switch(decision: Decision, setting, model, ddp, batch, autocast, context, record_key: str):
    """(train_model, CompileReport) once `decision` is made: the eager module, or the compiled one
    after a warm-up on `batch` (compile + call, a timed compiled call, a timed eager call) whose
    numbers go to the calibration record. Under auto a compile that fails or a compiled call that
    is not faster leaves the eager module (on every rank alike)."""
    eager_module = ddp if ddp is not None else model
    report = CompileReport(decision)
    if not decision.compile:
        return eager_module, report
    device, failure = context.device, None
    train_model = compile_model(model, ddp)
    try:
        with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
            compiled_call = _forward_backward(train_model, batch, autocast, device)
            first, report.compiled_s = _timed(compiled_call, device), _timed(compiled_call, device)
            eager_call = _forward_backward(eager_module, batch, autocast, device)
            report.eager_s = _timed(eager_call, device)
    except Exception as error:  # noqa: BLE001  (auto must not end a run the eager path can do)
        if setting != "auto":
            raise
        failure = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    if setting == "auto" and distributed.max_over_ranks(int(failure is not None), context):
        report.note = f"compiling failed ({failure or 'on another rank'}): eager"
        return eager_module, report
    report.compile_s = max(first - report.compiled_s, 0.0)
    if context.is_main:
        speedup = report.eager_s / report.compiled_s
        save_record(records_path(), record_key, report.compile_s, speedup)
    slower = report.compiled_s >= report.eager_s
    if setting == "auto" and distributed.broadcast_object(slower, context):
        report.note = "the compiled step measured no faster than eager: eager"
        return eager_module, report
    report.compiled = True
    return train_model, report


DECIDE_AFTER = 2  # auto times this process's 2nd optimizer step (the 1st has first-call costs)


class Compiler:
    """The run's compiling: `start` before the loop, `after_step` after every optimizer step.

    0 and 1 are settled at start (1 compiles and warms up there). auto trains eagerly, times the
    steps, and after the DECIDE_AFTER-th one decides by the rule above (rank 0's numbers,
    broadcast), then compiles or not for the rest of the run; the choice is written into the
    flags (use_compile 0/1), so checkpoints saved from then on resume with it."""

    def __init__(self, setting):
        self.setting = setting
        self.report: Optional[CompileReport] = None
        self.steps_timed = 0

    def start(self, model, ddp, loader, autocast, context, dtype, grad_checkpointing):
        """The module the loop starts with."""
        decision = decide(self.setting, 0, 0.0, FIRST_GUESS)
        if self.setting == 0:
            self.report = CompileReport(decision)
            return ddp if ddp is not None else model
        self.batch = first_batch(loader, loader.batch_size or 1)
        self.key = signature(model.config, self.batch, dtype, context.device, context.world_size,
                             grad_checkpointing)
        if self.setting == "auto":
            return ddp if ddp is not None else model
        train_model, self.report = switch(decision, self.setting, model, ddp, self.batch, autocast,
                                          context, self.key)
        return train_model

    def after_step(self, run, step_s: float) -> None:
        """auto, after the DECIDE_AFTER-th step: decide and switch run.train_model (all ranks)."""
        if self.report is not None:
            return
        self.steps_timed += 1
        if self.steps_timed < DECIDE_AFTER:
            return
        args, state, context = run.args, run.state, run.context
        steps_left = state.total_steps - state.step
        decision = None
        if context.is_main:  # rows of this epoch left after the steps this process ran
            rows_left = len(run.data.sampler) - self.steps_timed * args.accumulation_steps * \
                args.batch_size
            shapes = shapes_in_run(max(rows_left, 0), args.batch_size,
                                   steps_left * args.accumulation_steps)
            estimate = estimate_for(load_records(records_path()), self.key)
            decision = decide("auto", steps_left, step_s, estimate, shapes)
        decision = distributed.broadcast_object(decision, context)
        run.train_model, self.report = switch(decision, "auto", run.model, run.ddp, self.batch,
                                              run.autocast, context, self.key)
        args.use_compile = int(self.report.compiled)
        run.log(self.report.line())
