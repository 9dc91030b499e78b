"""Pretraining: `python -m minimind_fast.pretrain` or `torchrun --nproc_per_node=N -m minimind_fast.pretrain`.

Reads top to bottom like nanoGPT's train.py: set up (run directory, flags, data, model,
optimizer, resume) -> the loop (one optimizer step per window of micro-batches, then maybe log /
evaluate / save / stop) -> finish (final evaluation and checkpoint, loss curve, a sample).
MiniMind's trainer/train_pretrain.py done right: DDP no_sync() on non-final micro-steps, an LR
that is a pure function of the step, atomic checkpoints, bit-exact resume, host syncs only at
log/eval/save points, a health policy over bad steps, and SIGTERM/SIGINT that end with a
checkpoint. The parts live in minimind_fast/train/ (one concern each); `sft.py` runs this same
loop on conversations. With no arguments it trains the `demo` preset on the default corpus.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from . import compat
from .constants import IGNORE_INDEX
from .data import count_tokens
from .inference import sample_reply, sample_text
from .model import MiniMindForCausalLM, count_parameters
from .checkpoints import CONFIG_FILE, TOKENIZER_FILES
from .data.tokenizer import load_tokenizer
from .dtypes import default_dtype_name, resolve_dtype
from .fileio import copy_file_atomic, describe_write_error, write_json_atomic
from .train import accumulation, checkpoint, cli, data_setup, distributed, metrics, optim, precision, prepare
from .train import compile as autocompile
from .train.health import Health, TrainingUnhealthy, weights_finite
from .train.metrics import IntervalMeter, MetricsError, Reporter
from .train import resume
from .train.run_dir import RunDirectory
from .train.schedule import step_learning_rate
from .train.signals import StopRequest
from .train.state import TrainState

LAUNCHED = time.perf_counter()  # time-to-first-step counts from here


class Task(NamedTuple):
    """What differs between the entry points that share this loop."""
    prog: str
    make_parser: Callable[[], cli.ArgumentParser]
    build_data: Callable[..., data_setup.TrainingData]
    sample_prompt: Callable[[Any, str], list[int]] = None  # tokenizer, prompt -> prompt ids
    fresh_defaults: Callable[[Any, set[str]], None] = None  # (flags, typed flags) of a new run


PRETRAIN = Task(cli.PROG, cli.build_parser, data_setup.build_data)


class Stopped(Exception):
    """SIGTERM/SIGINT arrived; the loop ended at an optimizer-step boundary."""


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""
    args: Any
    task: Task
    context: distributed.DistContext
    run_dir: RunDirectory
    config: Any
    model: MiniMindForCausalLM
    train_model: torch.nn.Module  # the model under DDP / torch.compile
    ddp: Optional[DistributedDataParallel]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    data: data_setup.TrainingData
    state: TrainState
    health: Health
    meter: IntervalMeter
    reporter: Reporter
    stop: StopRequest
    flops_per_token: float
    peak_flops: Optional[float]
    last_saved: int
    first_step: int
    lr: float = 0.0
    compiler: Optional[autocompile.Compiler] = None

    def log(self, message: str) -> None:
        self.reporter.print(message)


# ---- set up ------------------------------------------------------------------------------------


def main(argv=None, task: Task = PRETRAIN) -> int:
    args, explicit = cli.parse_args(argv, task.make_parser)
    try:
        context = distributed.init_distributed(args.device, args.ddp_timeout)
    except ValueError as error:
        cli.fail(error, task.prog)
    run, failed = None, True
    try:
        run = setup(args, explicit, context, task)
        try:
            train(run)
        except Stopped:
            failed = False
            return stop_on_signal(run)
        finish(run)
        failed = False
        return 0
    except (TrainingUnhealthy, checkpoint.CheckpointError, MetricsError) as error:
        print(f"{task.prog}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # before the loop's own SIGINT handling, or raised by a callee
        where = "; nothing was saved" if run is None else "; continue with --from_resume 1 (the newest checkpoint)"
        print(f"{task.prog}: interrupted{where}", file=sys.stderr, flush=True)
        return 130
    finally:
        if run is not None:
            run.reporter.close()
            run.run_dir.release()
        distributed.teardown(context, failed)


def setup(args, explicit: set[str], context, task: Task) -> Run:
    """Run directory -> flags -> data -> model -> optimizer -> progress. User errors exit 2."""
    log = print if context.is_main else (lambda *_: None)
    run_dir = None
    try:
        run_dir, candidates = prepare.open_run_dir(args, context, log)
        source, saved = prepare.load_resume(candidates, log)
        args, base = prepare.resolve_flags(args, explicit, saved, source, context.device, log)
        if saved is None and task.fresh_defaults is not None:
            task.fresh_defaults(args, explicit)
        config = prepare.model_config(args, saved, base)
        dtype = resolve_dtype(args.dtype or default_dtype_name(context.device), context.device)
        args.dtype = str(dtype).replace("torch.", "")
        data = task.build_data(args, config, context, source)
        args.data_path = str(data.data_path)
        distributed.seed_everything(args.seed)  # same initial weights on every rank
        model = MiniMindForCausalLM(config)
        prepare.initial_weights(model, args, config, saved, source, log)
        model.to(context.device)
        if args.grad_checkpointing:
            optim.apply_grad_checkpointing(model)
        optimizer = optim.build_optimizer(model, args.learning_rate, args.weight_decay, args.adam_betas,
                                          args.weight_decay_on)
        scaler = precision.make_grad_scaler(context.device, dtype)
        if saved is not None:
            prepare.restore_optimizer(optimizer, scaler, saved, source)
        state = prepare.train_state(args, data, saved, source, context, log)
        prepare.schedule(state, args, context.world_size, saved is not None, log)
        prepare.restore_rng(saved, args, context, state.step)
        if context.is_main:
            claim_run_dir(run_dir, state, config, args, data, fresh=saved is None)
    except ValueError as error:  # includes DataError and RunDirError
        if run_dir is not None:
            run_dir.release(undo=True)
        cli.fail(error, task.prog)
    return assemble(args, task, context, run_dir, config, model, optimizer, scaler, dtype, data, state, saved)


def claim_run_dir(run_dir: RunDirectory, state: TrainState, config, args, data, fresh: bool) -> None:
    """Rank 0: own the directory, keep the run's metrics to its saved step, write config and tokenizer."""
    mirror = checkpoint.minimind_weight_name(args.save_weight, config.hidden_size, config.use_moe)
    run_dir.claim(state.run_id, mirror, fresh)
    try:
        metrics.truncate_metrics(run_dir.metrics_path, state.step)
        write_json_atomic(run_dir.path / CONFIG_FILE, config.to_dict())
        for name in TOKENIZER_FILES:
            if (data.tokenizer_dir / name).is_file():
                copy_file_atomic(data.tokenizer_dir / name, run_dir.path / name)
    except OSError as error:
        raise checkpoint.CheckpointError(
            f"writing to {run_dir.path} failed: {describe_write_error(error, run_dir.path)}") from error


def assemble(args, task, context, run_dir, config, model, optimizer, scaler, dtype, data, state, saved) -> Run:
    """Wrap the model for DDP / compile and create the loop's meters and output."""
    ddp, train_model = None, model
    if context.distributed:  # the only buffers, RoPE tables, are derived: DDP never broadcasts them
        compat.ddp_ignore(model, [name for name, _ in model.named_buffers()])
        ddp = train_model = DistributedDataParallel(
            model, device_ids=[context.device.index] if context.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    autocast = precision.autocast_context(context.device, dtype)
    compiler = autocompile.Compiler(args.use_compile)  # auto: decided after the first steps
    train_model = compiler.start(model, ddp, data.loader, autocast, context, dtype,
                                 args.grad_checkpointing)
    counts = count_parameters(model)
    reporter = Reporter(run_dir.path, context.is_main, state.total_steps, state.step, args.tracker,
                        args.wandb_project, state.run_id, args.run_name, vars(args))
    run = Run(args, task, context, run_dir, config, model, train_model, ddp, optimizer, scaler,
              autocast, data, state,
              Health(args.max_bad_steps, context.device), IntervalMeter(context.device), reporter, StopRequest(),
              metrics.flops_per_token(config, args.max_seq_len, counts["active"], counts["embedding"]),
              metrics.peak_flops(context.device, dtype), state.step if saved is not None else -1, state.step)
    model = f"of {args.model_from}" if getattr(args, "model_from", None) else args.preset
    run.log(f"model {model}: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
            f"{args.dtype} on {context.device} x{context.world_size}; {state.num_samples} rows of {args.max_seq_len} "
            f"tokens ({'packed' if args.packing else 'padded'}); global batch {args.batch_size}x"
            f"{args.accumulation_steps}x{context.world_size}; {state.total_steps} steps, warmup "
            f"{state.warmup_steps}, lr {args.learning_rate:g}->{args.min_lr:g}")
    run.compiler = compiler
    if compiler.report is not None:
        run.log(compiler.report.line())
    return run


# ---- the loop ----------------------------------------------------------------------------------


def train(run: Run) -> None:
    """One optimizer step per window of micro-batches, then log / evaluate / save / stop."""
    run.model.train()
    run.stop.install()
    try:
        for micro_batches, window, end_of_epoch in step_windows(run):
            if run.state.step >= run.state.total_steps:
                break
            started = time.perf_counter()
            train_step(run, micro_batches, window)
            step_s = time.perf_counter() - started
            run.state.finish_step(end_of_epoch)
            maybe_log(run)
            paused = time.perf_counter()  # compiling, evaluating, saving: not in tokens/s
            run.compiler.after_step(run, step_s)
            maybe_evaluate(run)
            maybe_save(run)
            run.meter.pause(time.perf_counter() - paused)
            if run.stop.agreed(run.context):
                raise Stopped
    finally:
        run.stop.restore()


def step_windows(run: Run):
    """(micro-batches, window, end_of_epoch) for each optimizer step from the saved position on.
    An epoch's last window may be short; with --max_steps the data is cycled."""
    args, state, sampler = run.args, run.state, run.data.sampler
    while args.max_steps or state.epoch < args.epochs:
        sampler.set_epoch(state.epoch, state.consumed)
        num_micro = math.ceil(len(sampler) / args.batch_size)
        if num_micro == 0:
            state.next_epoch()
            continue
        batches = iter(run.data.loader)
        for first in range(0, num_micro, args.accumulation_steps):
            window = min(args.accumulation_steps, num_micro - first)
            yield itertools.islice(batches, window), window, first + window == num_micro


def train_step(run: Run, micro_batches, window: int) -> None:
    """Forward/backward over the window (gradient sync on its last micro-batch only), then clip
    and step; losses stay on the device."""
    args, context, device = run.args, run.context, run.context.device
    run.lr = step_learning_rate(args, run.state, window, context.world_size)
    optim.set_learning_rate(run.optimizer, run.lr)
    step_loss = torch.zeros((), device=device)
    step_aux = torch.zeros((), device=device)
    batches = list(micro_batches)  # a window's labels decide its weights before any backward
    weights = accumulation.micro_batch_weights([accumulation.scored_targets(b) for b in batches],
                                               args.recipe, context)
    for index, (batch, weight) in enumerate(zip(batches, weights)):
        rows = batch["input_ids"].shape[0]
        run.meter.add_batch(rows, batch["input_ids"].numel(), count_tokens(batch))
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        segment_ids = batch.get("segment_ids")  # packed SFT rows: attend within a conversation
        if segment_ids is not None:
            segment_ids = segment_ids.to(device, non_blocking=True)
        last = index == window - 1
        sync = contextlib.nullcontext() if run.ddp is None or last else run.ddp.no_sync()
        with sync:
            with run.autocast:
                out = run.train_model(input_ids, labels=labels, segment_ids=segment_ids)
            run.scaler.scale(out.loss * weight + out.aux_loss / window).backward()
        step_loss += out.loss.detach().float() * weight  # the ranks' mean is the step's token mean
        step_aux += out.aux_loss.detach().float() / window
        run.state.start_step(rows * context.world_size)
    grad_norm, skipped = optim.clip_and_step(run.optimizer, run.scaler, args.grad_clip)
    run.health.update(run.state.step + 1, step_loss, skipped)
    run.meter.add_step(step_loss, step_aux, grad_norm, skipped)


def check_health(run: Run):
    """One host sync; stop the run (TrainingUnhealthy) once max_bad_steps bad steps came in a row."""
    report = run.health.check(run.context)
    if report.tripped_at is not None:
        good = run.run_dir.newest_healthy()
        raise TrainingUnhealthy(
            f"{run.args.max_bad_steps} consecutive optimizer steps from step {report.tripped_at} had a NaN/inf "
            f"loss or non-finite gradients (skipped); stopped at step {run.state.step}. Last healthy "
            f"checkpoint: {good or 'none'} (resume it with --from_resume 1 and a lower --learning_rate or "
            "--dtype float32; --max_bad_steps sets the limit)")
    return report


def maybe_log(run: Run) -> None:
    step, args = run.state.step, run.args
    if not (step % args.log_interval == 0 or step == run.state.total_steps or step == run.first_step + 1):
        return
    check_health(run)
    values = run.meter.reduce(run.context, distributed)
    record = metrics.train_record(values, step, run.state.epoch_of_step, run.lr, run.flops_per_token,
                                  args.max_seq_len, run.peak_flops, run.context, run.state.total_steps)
    line = metrics.format_record(record, run.state.total_steps, run.config.use_moe)
    if step == run.first_step + 1:  # this process's first: setup (and a forced compile) included
        record["time_to_first_step_s"] = round(time.perf_counter() - LAUNCHED, 2)
        line += f" | first step {record['time_to_first_step_s']:.1f} s after start"
    run.reporter.record(record, line, advance_to=step)
    run.meter.reset()


def maybe_evaluate(run: Run, final: bool = False) -> None:
    every, step = run.args.eval_interval, run.state.step
    due = final or (every and step % every == 0 and step < run.state.total_steps)
    if not due or run.data.val_loader is None:
        return
    val_loss = evaluate(run.model, run.data.val_loader, run.args.eval_batches, run.context, run.autocast)
    record = {"step": step, "epoch": run.state.epoch_of_step, "val_loss": val_loss,
              "val_ppl": math.exp(min(val_loss, 50))}
    run.reporter.record(record, f"step {step}: validation loss {val_loss:.4f}")


def maybe_save(run: Run) -> None:
    every, step = run.args.save_interval, run.state.step
    if every and step % every == 0 and step < run.state.total_steps:
        save(run)


def save(run: Run) -> None:
    """Checkpoint the current step: healthy only if the last step was good; never when the
    weights are not finite (nothing could resume from them)."""
    report = check_health(run)
    if not weights_finite(run.model.parameters()):
        raise TrainingUnhealthy(f"the weights hold NaN/inf at step {run.state.step}, so no checkpoint was saved; "
                                f"last healthy checkpoint: {run.run_dir.newest_healthy() or 'none'}")
    rng_states = distributed.gather_objects(resume.capture_rng_state(), run.context)
    if run.context.is_main:
        resume_state = {"optimizer": run.optimizer.state_dict(),
                        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
                        "train_state": run.state.state_dict(), "world_size": run.context.world_size,
                        "rng": rng_states, "args": vars(run.args)}
        path = checkpoint.save_checkpoint(run.run_dir.path, run.state.step, run.model, resume_state, run.config,
                                          run.run_dir.mirror_name, run.data.tokenizer_dir, run.state.run_id,
                                          healthy=report.healthy)
        run.run_dir.after_save(path, report.healthy, run.args.keep_checkpoints, run.log)
        run.log(f"saved {path}" + ("" if report.healthy else f" (marked unhealthy: the last {report.streak} "
                                                            "step(s) were bad)"))
    run.last_saved = run.state.step


@torch.no_grad()
def evaluate(model, loader, max_batches, context, autocast) -> float:
    """Token-weighted mean validation loss over all ranks (NaN when there is nothing to score)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=context.device)
    for _, batch in zip(range(max_batches), loader):
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if targets == 0:
            continue
        segment_ids = batch.get("segment_ids")
        if segment_ids is not None:
            segment_ids = segment_ids.to(context.device)
        with autocast:
            out = model(batch["input_ids"].to(context.device),
                        labels=batch["labels"].to(context.device), segment_ids=segment_ids)
        totals += torch.stack([out.loss.double() * targets, totals.new_tensor(targets)])
    model.train()
    distributed.all_reduce(totals, context)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


# ---- finish ------------------------------------------------------------------------------------


def finish(run: Run) -> None:
    """Final evaluation and checkpoint; a run that ends in a bad streak ends with an error."""
    maybe_evaluate(run, final=True)
    if run.state.step > run.last_saved:
        save(run)
    report = check_health(run)
    if not report.healthy:
        raise TrainingUnhealthy(f"the run ended with {report.streak} bad optimizer step(s) in a row (NaN/inf loss "
                                f"or skipped); its final checkpoint is marked unhealthy. Last healthy checkpoint: "
                                f"{run.run_dir.newest_healthy() or 'none'}")
    if not run.context.is_main:
        return
    run.reporter.close()
    png = metrics.plot_loss_curve(run.run_dir.metrics_path, run.run_dir.path / "loss_curve.png")
    print(f"done: {run.state.step} steps; weights in {run.run_dir.path}" + (f"; loss curve {png}" if png else ""),
          flush=True)
    if run.args.sample_tokens:
        tokenizer = load_tokenizer(run.data.tokenizer_dir)
        if run.task.sample_prompt is None:
            text = sample_text(run.model, tokenizer, run.args.sample_prompt, run.args.sample_tokens,
                               seed=run.args.seed)
            print(f"sample: {text}", flush=True)
        else:  # a chat model: the reply to the prompt as a user message
            ids = run.task.sample_prompt(tokenizer, run.args.sample_prompt)
            reply = sample_reply(run.model, tokenizer, ids, run.args.sample_tokens,
                                 seed=run.args.seed)
            print(f"question: {run.args.sample_prompt}\nanswer: {reply}", flush=True)


def stop_on_signal(run: Run) -> int:
    """After SIGTERM/SIGINT: save the step just finished and say how to continue."""
    if run.state.step > run.last_saved:
        save(run)
    name = "SIGTERM" if run.stop.exit_code == 143 else "SIGINT"
    if run.context.is_main:
        newest = run.run_dir.newest_healthy()
        print(f"{run.task.prog}: stopped by {name} at step {run.state.step}; checkpoint {newest}; continue with "
              f"{run.task.prog} --from_resume 1 --save_dir {run.run_dir.path}", file=sys.stderr, flush=True)
    return run.stop.exit_code


if __name__ == "__main__":
    sys.exit(record(main)())  # record: under torchrun a rank's traceback reaches the launcher's summary
