"""Pretraining: `python -m minimind_fast.pretrain` or `torchrun --nproc_per_node=N -m minimind_fast.pretrain`.

Reads top to bottom like nanoGPT's train.py: parse -> distributed setup -> model/data/optimizer
-> resume -> loop -> save. MiniMind's trainer/train_pretrain.py (flags, AMP + GradScaler,
accumulation, cosine LR, DDP, checkpoint/resume) done right: non-final micro-steps under DDP
no_sync(), an LR that is a pure function of the step, atomic checkpoints, bit-exact resume, host
syncs only at log/eval/save points. Helpers live in minimind_fast/train/ (one concern each).
With no arguments it trains the `demo` preset on the default corpus (CPU: a few minutes) and
prints a sample from the final weights.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from . import compat
from .config import MiniMindConfig, get_preset
from .constants import IGNORE_INDEX
from .data import count_tokens
from .interop import load_weights, validate_state_dict
from .model import MiniMindForCausalLM, count_parameters
from .train import checkpoint, cli, distributed, metrics, optim, precision
from .train.data_setup import build_data, remaining_steps
from .train.schedule import learning_rate_at, resolve_warmup_steps

NONFINITE_PATIENCE = 5  # consecutive optimizer steps with a NaN/inf loss that stop the run


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for NONFINITE_PATIENCE optimizer steps."""


@torch.no_grad()
def evaluate(model, loader, max_batches, context, autocast) -> float:
    """Token-weighted mean validation loss over all ranks (NaN when there is nothing to score)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=context.device)
    for _, batch in zip(range(max_batches), loader):
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if targets == 0:
            continue
        with autocast:
            out = model(batch["input_ids"].to(context.device), labels=batch["labels"].to(context.device))
        totals += torch.stack([out.loss.double() * targets, totals.new_tensor(targets)])
    model.train()
    distributed.all_reduce(totals, context)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


def resolve_from_weight(args, config):
    """--from_weight: a path (weights file, checkpoint / run / exported HF directory), or MiniMind's
    prefix form {save_dir}/{name}_{hidden}[_moe].pth."""
    path = Path(args.from_weight).expanduser()
    if path.exists():
        return checkpoint.resolve_checkpoint_path(path)
    name = checkpoint.minimind_weight_name(args.from_weight, config.hidden_size, config.use_moe)
    prefixed = Path(args.save_dir) / name
    if prefixed.is_file():
        return prefixed
    raise ValueError(f"--from_weight {args.from_weight!r}: neither that path nor {prefixed} exists; pass a "
                     ".safetensors/.pth file, a checkpoint, run or exported Hugging Face directory, or 'none'")


def main(argv=None) -> int:
    # ---- parse, distributed setup --------------------------------------------------------------
    args = cli.parse_args(argv)
    try:
        context = distributed.init_distributed(args.device, args.ddp_timeout)
    except ValueError as error:
        cli.fail(error)
    failed = True
    try:
        train(args, context)
        failed = False
        return 0
    except (TrainingDiverged, checkpoint.CheckpointError) as error:
        print(f"{cli.PROG}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{cli.PROG}: interrupted; continue with --from_resume 1 (from the last checkpoint)", file=sys.stderr)
        return 130
    finally:
        distributed.teardown(context, failed)


def train(args, context) -> None:
    device, run_dir, log = context.device, Path(args.save_dir), print if context.is_main else (lambda *a: None)
    # ---- model config, data, model, optimizer, resume state (user errors exit 2) ----------------
    try:
        latest, state = checkpoint.load_latest_resume_state(run_dir, log) if args.from_resume else (None, None)
        if state is not None:
            if args.preset not in (None, state["args"]["preset"]):
                raise ValueError(f"--preset {args.preset}: {latest} was trained with "
                                 f"--preset {state['args']['preset']}; "
                                 "drop --preset to resume it, or start a new run in another --save_dir")
            args.preset = state["args"]["preset"]
        args.preset = args.preset or ("minimind2-small" if device.type == "cuda" else "demo")
        cli.apply_preset_defaults(args, args.preset)
        cli.check_model_flags(args, args.preset)
        overrides = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                         vocab_size=args.vocab_size, dropout=args.dropout,
                         use_moe=None if args.use_moe is None else bool(args.use_moe))
        config = get_preset(args.preset, **overrides)
        if state is not None:
            saved = MiniMindConfig.from_dict(state["config"])
            differ = [f"{k}={v} (checkpoint: {getattr(saved, k)})" for k, v in overrides.items()
                      if v is not None and v != getattr(saved, k)]
            if differ:
                raise ValueError(f"{latest} was trained with a different model: {', '.join(differ)}; drop those "
                                 "flags to resume it, or start a new run in another --save_dir")
            config = saved
        if args.max_seq_len > config.max_position_embeddings:
            raise ValueError(f"--max_seq_len {args.max_seq_len} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}; use --max_seq_len <= {config.max_position_embeddings}")
        dtype = precision.resolve_dtype(args.dtype or precision.default_dtype_name(device), device)
        args.dtype = str(dtype).replace("torch.", "")
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"--save_dir {run_dir} is a file, not a directory; pick another path")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / f".write-test-{context.rank}", "w"):
                pass
            (run_dir / f".write-test-{context.rank}").unlink()
        except OSError as error:
            raise ValueError(f"--save_dir {run_dir} is not writable ({error.strerror}); "
                             "pick another directory") from None
        loader, sampler, val_loader, tokenizer_dir = build_data(args, config, context, latest)

        distributed.seed_everything(args.seed)  # same initial weights on every rank
        model = MiniMindForCausalLM(config)
        if state is not None:
            model.load_state_dict(validate_state_dict(state["model"], config, source=str(latest)))
        elif args.from_weight.lower() != "none":
            weights = resolve_from_weight(args, config)
            found, weights_state = load_weights(weights, config)  # validated against config's shapes
            model.load_state_dict(weights_state)
            log(f"initial weights: {weights}")
            found_values = found.to_dict() if found is not None else {}
            differ = [f"{k}={v!r} (this run: {getattr(config, k)!r})" for k, v in found_values.items()
                      if k not in ("dropout", "extra") and v != getattr(config, k)]
            if differ:
                log(f"warning: {weights} was configured with {', '.join(differ)}; this run uses its own values")
        model.to(device)
        if args.grad_checkpointing:
            optim.apply_grad_checkpointing(model)
        optimizer = optim.build_optimizer(model, args.learning_rate, args.weight_decay)
        scaler = precision.make_grad_scaler(device, dtype)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if scaler.is_enabled() and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
    except ValueError as error:  # includes DataError
        cli.fail(error)

    ddp = None
    train_model = model
    if context.distributed:  # the only buffers, RoPE tables, are derived: DDP never broadcasts them
        compat.ddp_ignore(model, [name for name, _ in model.named_buffers()])
        ddp = train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if args.use_compile:
        train_model = torch.compile(train_model, fullgraph=not context.distributed and not config.use_moe)
    autocast = precision.autocast_context(device, dtype)

    # ---- progress: fresh or resumed ---------------------------------------------------------------
    num_samples = sampler.num_samples
    step, epoch, consumed, run_id = 0, 0, 0, checkpoint.new_run_id()
    epoch_first_step = 0  # global step at which the current epoch began
    if state is not None:
        progress, run_id = state["progress"], state["run_id"]
        step, epoch, consumed = progress["step"], progress["epoch"], progress["consumed"]
        epoch_first_step = step - progress["step_in_epoch"]
        if progress["num_samples"] != num_samples:
            log(f"warning: the training split has {num_samples} rows, the checkpoint's had {progress['num_samples']}")
            if consumed > num_samples:
                epoch, consumed, epoch_first_step = epoch + 1, 0, step
        log(f"resumed {latest} at step {step} (epoch {epoch}, {consumed} samples into it)")
        if state["world_size"] != context.world_size:
            log(f"world size changed {state['world_size']} -> {context.world_size}: continuing from the same "
                f"{consumed} consumed samples; this run is not bit-identical to an uninterrupted one")
    elif args.from_resume:
        log(f"no complete checkpoint in {run_dir}; starting fresh")
    elif checkpoint.list_checkpoints(run_dir):
        log(f"note: {run_dir} holds checkpoints of an earlier run; this run's checkpoints supersede them "
            "(pass --from_resume 1 to continue that run instead)")
    total_steps = args.max_steps or step + remaining_steps(num_samples, epoch, consumed, args, context.world_size)
    warmup_steps = resolve_warmup_steps(total_steps, args.warmup_steps, args.warmup_ratio)
    counts = count_parameters(model)
    flops_per_token = metrics.flops_per_token(config, args.max_seq_len, counts["active"], counts["embedding"])
    peak = metrics.peak_flops(device, dtype)
    if context.is_main:  # metrics.jsonl reads as one run: drop records past the resumed step (all, if fresh)
        try:
            metrics.truncate_metrics(run_dir / "metrics.jsonl", step)
            checkpoint.write_json_atomic(run_dir / checkpoint.CONFIG_FILE, config.to_dict())
            for name in checkpoint.TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    checkpoint.copy_file_atomic(tokenizer_dir / name, run_dir / name)
        except OSError as error:
            raise checkpoint.CheckpointError(f"writing to {run_dir} failed: {error}; free disk space or pick "
                                             "another --save_dir") from error
    log(f"model {args.preset}: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
        f"{args.dtype} on {device} x{context.world_size}; {num_samples} rows of {args.max_seq_len} tokens "
        f"({'packed' if args.packing else 'padded'}); global batch {args.batch_size}x{args.accumulation_steps}"
        f"x{context.world_size}; {total_steps} steps, warmup {warmup_steps}, "
        f"lr {args.learning_rate:g}->{args.min_lr:g}")
    reporter = metrics.Reporter(run_dir, context.is_main, total_steps, step, bool(args.use_wandb),
                                args.wandb_project, run_id, vars(args))
    if state is None:
        distributed.seed_everything(args.seed + context.rank)
    elif state["world_size"] == context.world_size:
        checkpoint.restore_rng_state(state["rng"][context.rank])
    else:
        distributed.seed_everything(args.seed + context.rank + 1_000_003 * step)
    last_saved = step if state is not None else -1
    state = None  # free the loaded tensors

    def check_health() -> None:
        """One host sync: stop if the loss has been non-finite for NONFINITE_PATIENCE steps."""
        flag = distributed.all_reduce(diverged_at.clone(), context, op="max").item()
        if flag >= 0:
            good = checkpoint.latest_checkpoint(run_dir)
            raise TrainingDiverged(
                f"the loss was NaN/inf for {NONFINITE_PATIENCE} consecutive optimizer steps from step {flag + 1}; "
                f"stopped at step {step}. Last good checkpoint: {good or 'none'} (resume with --from_resume 1 "
                "and a lower --learning_rate, or --dtype float32)")

    def save() -> None:
        nonlocal last_saved
        check_health()
        rng_states = distributed.gather_objects(checkpoint.capture_rng_state(), context)
        if context.is_main:
            resume_state = {
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "progress": {"step": step, "epoch": epoch, "step_in_epoch": step - epoch_first_step,
                             "consumed": consumed, "num_samples": num_samples},
                "world_size": context.world_size, "rng": rng_states, "args": vars(args),
                "schedule": {"total_steps": total_steps, "warmup_steps": warmup_steps}}
            path = checkpoint.save_checkpoint(run_dir, step, model, resume_state, config, args.save_weight,
                                              args.keep_checkpoints, tokenizer_dir, run_id)
            reporter.print(f"saved {path}")
        last_saved = step

    def run_eval() -> None:
        if val_loader is not None:
            val_loss = evaluate(model, val_loader, args.eval_batches, context, autocast)
            record = {"step": step, "epoch": step_epoch + 1, "val_loss": val_loss,
                      "val_ppl": math.exp(min(val_loss, 50))}
            reporter.record(record, f"step {step}: validation loss {val_loss:.4f}")

    # ---- training loop ----------------------------------------------------------------------------
    # Per-interval sums stay on the device; .item() happens only at log/eval/save points.
    sums = torch.zeros(4, device=device)  # loss, aux_loss, grad norm (finite steps), skipped steps
    diverged_at = torch.full((), -1, dtype=torch.long, device=device)
    streak = torch.zeros((), dtype=torch.long, device=device)
    tokens = rows = 0
    step_epoch, first_step, interval_start, interval_steps = epoch, step, time.perf_counter(), 0
    model.train()
    while step < total_steps and (args.max_steps or epoch < args.epochs):
        sampler.set_epoch(epoch, consumed)
        num_micro = math.ceil(len(sampler) / args.batch_size)
        if num_micro == 0:
            epoch, consumed, epoch_first_step = epoch + 1, 0, step
            continue
        step_loss = torch.zeros((), device=device)
        step_aux = torch.zeros((), device=device)
        for micro, batch in zip(range(num_micro), loader):
            if micro % args.accumulation_steps == 0:  # a new optimizer step; the epoch's last may be partial
                window = min(args.accumulation_steps, num_micro - micro)
                lr = learning_rate_at(step, total_steps, args.learning_rate, args.min_lr, warmup_steps)
                optim.set_learning_rate(optimizer, lr)
            last_micro = micro % args.accumulation_steps == window - 1
            tokens += count_tokens(batch)
            rows += batch["input_ids"].shape[0]
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            sync = contextlib.nullcontext() if ddp is None or last_micro else ddp.no_sync()
            with sync:
                with autocast:
                    out = train_model(input_ids, labels=labels)
                scaler.scale((out.loss + out.aux_loss) / window).backward()
            step_loss += out.loss.detach().float() / window
            step_aux += out.aux_loss.detach().float() / window
            consumed += batch["input_ids"].shape[0] * context.world_size
            if not last_micro:
                continue
            grad_norm, skipped = optim.clip_and_step(optimizer, scaler, args.grad_clip)
            bad = ~torch.isfinite(step_loss)
            streak = torch.where(bad, streak + 1, 0)
            diverged_at = torch.where((streak >= NONFINITE_PATIENCE) & (diverged_at < 0), step - NONFINITE_PATIENCE + 1,
                                      diverged_at)
            sums += torch.stack([step_loss, step_aux, torch.nan_to_num(grad_norm * (1 - skipped)), skipped])
            step_loss = torch.zeros((), device=device)
            step_aux = torch.zeros((), device=device)
            step, step_epoch = step + 1, epoch
            interval_steps += 1
            if micro + 1 == num_micro:
                epoch, consumed, epoch_first_step = epoch + 1, 0, step

            if step % args.log_interval == 0 or step == total_steps or step == first_step + 1:
                check_health()
                counters = sums.new_tensor([tokens, rows], dtype=torch.float64)
                totals = distributed.all_reduce(torch.cat([sums.double(), counters]), context)
                elapsed = time.perf_counter() - interval_start
                loss, aux, norm_sum, skipped_sum, token_sum, row_sum = totals.tolist()
                loss, aux = loss / context.world_size / interval_steps, aux / context.world_size / interval_steps
                done = interval_steps - skipped_sum / context.world_size
                tokens_per_s = token_sum / elapsed
                flops = flops_per_token * row_sum * args.max_seq_len / elapsed
                record = {"step": step, "epoch": step_epoch + 1, "loss": loss, "aux_loss": aux, "lr": lr,
                          "grad_norm": norm_sum / context.world_size / max(done, 1), "skipped_steps": skipped_sum,
                          "tokens_per_s": tokens_per_s, "tflops": flops / 1e12,
                          "mfu": flops / (peak * context.world_size) if peak else None,
                          "peak_mem_gb": metrics.peak_memory_gb(device),
                          "eta_s": (total_steps - step) * elapsed / interval_steps}
                reporter.record(record, metrics.format_record(record, total_steps, config.use_moe), advance_to=step)
                sums.zero_()
                tokens = rows = interval_steps = 0
                interval_start = time.perf_counter()
            paused = time.perf_counter()  # evaluation and saving do not count against tokens/s
            if args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
                run_eval()
            if args.save_interval and step % args.save_interval == 0 and step < total_steps:
                save()
            interval_start += time.perf_counter() - paused
            if step >= total_steps:
                break

    # ---- end of run: evaluate, save, plot, sample ----------------------------------------------
    run_eval()
    if step > last_saved:
        save()
    reporter.close()
    if context.is_main:
        png = metrics.plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        print(f"done: {step} steps; weights in {run_dir}" + (f"; loss curve {png}" if png else ""), flush=True)
        if args.sample_tokens:
            from .generate import sample_text
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_dir)
            text = sample_text(model, tokenizer, args.sample_prompt, args.sample_tokens, seed=args.seed)
            print(f"sample: {text}", flush=True)


if __name__ == "__main__":
    sys.exit(record(main)())  # record: under torchrun a rank's traceback reaches the launcher's summary
