"""Training metrics: FLOP accounting and MFU, peak memory, progress output, JSONL/wandb/TensorBoard
sinks and the loss-curve PNG.

FLOPs per token follow the PaLM paper (appendix B) as nanoGPT's `estimate_mfu` does:
6 * N for the forward and backward matmuls, N the parameters touched per token (active experts
only for MoE; the embedding lookup is free but a tied lm_head matmul is not), plus
12 * layers * heads * head_dim * T for attention scores and values. MFU divides the achieved rate
by the dense peak of the GPU in the training dtype (known for A100/H100/H200).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..fileio import describe_write_error

# Dense peak FLOP/s per GPU from NVIDIA's datasheets: (bf16/fp16 tensor core, fp32 without TF32).
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM / NVL
    "A100": (312e12, 19.5e12),
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """The device's dense peak FLOP/s in `dtype`, or None when unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, single) in PEAK_FLOPS.items():
        if all(part in name for part in key.split()):
            return single if dtype == torch.float32 else half
    return None


def flops_per_token(
    config, seq_len: int, active_parameters: int, embedding_parameters: int
) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * L * heads * head_dim * T."""
    matmul = active_parameters - embedding_parameters  # the lookup is not a matmul ...
    matmul += (
        config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    )  # ... the tied head is
    attention = (
        12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    )
    return 6.0 * matmul + attention


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 2**20 if sys.platform != "darwin" else kib / 2**30
    except ImportError:
        return float("nan")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_record(record: dict[str, Any], total_steps: int, show_aux: bool = False) -> str:
    """One log line:
    `epoch 1 step 50/205 | loss 5.1234 | lr 2.95e-03 | grad 0.812 | 7.1k tok/s ...`."""
    parts = [
        f"epoch {record['epoch']} step {record['step']}/{total_steps}",
        f"loss {record['loss']:.4f}" + (f" aux {record['aux_loss']:.4f}" if show_aux else ""),
        f"lr {record['lr']:.2e}",
        f"grad {record['grad_norm']:.3f}",
        f"{record['tokens_per_s'] / 1e3:.1f}k tok/s {record['tflops']:.3f} TFLOP/s"
        + (f" MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""),
        f"mem {record['peak_mem_gb']:.2f} GB",
        f"eta {format_duration(record['eta_s'])}",
    ]
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']:.0f}")
    return " | ".join(parts)


def train_record(
    values: dict[str, float],
    step: int,
    epoch: int,
    lr: float,
    flops_per_token: float,
    seq_len: int,
    peak: Optional[float],
    context,
    total_steps: int,
) -> dict[str, Any]:
    """One metrics.jsonl record from IntervalMeter.reduce's totals. Throughput counts every token
    processed (tokens_per_s, tflops: padding included, which the model computes on) and the
    tokens that carry loss (scored_tokens_per_s)."""
    elapsed = values["elapsed"]
    flops = flops_per_token * values["rows"] * seq_len / elapsed
    return {
        "step": step,
        "epoch": epoch,
        "loss": values["loss"],
        "aux_loss": values["aux_loss"],
        "lr": lr,
        "grad_norm": values["grad_norm"],
        "skipped_steps": values["skipped_steps"],
        "tokens_per_s": values["tokens"] / elapsed,
        "scored_tokens_per_s": values["scored_tokens"] / elapsed,
        "tflops": flops / 1e12,
        "mfu": flops / (peak * context.world_size) if peak else None,
        "peak_mem_gb": peak_memory_gb(context.device),
        "eta_s": (total_steps - step) * elapsed / max(values["steps"], 1),
    }


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that died before its next checkpoint),
    so a resumed run's metrics file reads as one continuous run."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by a crash
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsError(RuntimeError):
    """metrics.jsonl could not be written (disk full, permissions); the file is left as it was."""


class IntervalMeter:
    """What a log line reports about the steps since the previous one. Step values are summed on
    the device (no host sync per step); token and row counts are host integers; `reduce` does
    one all-reduce and returns named totals over all ranks."""

    STEP_FIELDS = ("loss", "aux_loss", "grad_norm", "skipped_steps")

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.STEP_FIELDS), dtype=torch.float32, device=self.device)
        self.tokens = self.scored_tokens = self.rows = self.steps = 0
        self.start = time.perf_counter()

    def add_batch(self, rows: int, tokens: int, scored_tokens: int) -> None:
        self.rows, self.tokens, self.scored_tokens = (
            self.rows + rows,
            self.tokens + tokens,
            self.scored_tokens + scored_tokens,
        )

    def add_step(
        self,
        loss: torch.Tensor,
        aux_loss: torch.Tensor,
        grad_norm: torch.Tensor,
        skipped: torch.Tensor,
    ) -> None:
        """Per-step 0-d tensors; the norm of a skipped step is not averaged in (it is inf/NaN)."""
        self.sums += torch.stack(
            [
                loss.float(),
                aux_loss.float(),
                torch.nan_to_num(grad_norm * (1 - skipped)),
                skipped.float(),
            ]
        )
        self.steps += 1

    def pause(self, seconds: float) -> None:
        """Exclude `seconds` (evaluation, saving) from the interval's elapsed time."""
        self.start += seconds

    def reduce(self, context, distributed) -> dict[str, float]:
        counts = torch.tensor([self.tokens, self.scored_tokens, self.rows], dtype=torch.float64)
        totals = distributed.all_reduce(
            torch.cat([self.sums.double(), counts.to(self.device)]), context
        ).tolist()
        ranks, steps = context.world_size, max(self.steps, 1)
        values = dict(zip(self.STEP_FIELDS + ("tokens", "scored_tokens", "rows"), totals))
        values["loss"] /= ranks * steps
        values["aux_loss"] /= ranks * steps
        done = steps - values["skipped_steps"] / ranks
        values["grad_norm"] /= ranks * max(done, 1)
        values["skipped_steps"] = values["skipped_steps"] / ranks
        values["elapsed"] = max(time.perf_counter() - self.start, 1e-9)
        values["steps"] = self.steps
        return values


class Reporter:
    """Rank 0's output: a tqdm bar on a terminal (plain lines otherwise), metrics.jsonl, the
    tracker (wandb or swanlab) when asked for, and TensorBoard whenever it is installed. On other
    ranks every method is a no-op."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        initial_step: int,
        tracker: str = "none",
        project: str = "minimind_fast",
        run_id: str = "",
        run_name: Optional[str] = None,
        run_config: Optional[dict] = None,
    ):
        self.enabled = enabled
        self.bar = self.tracker = self.tensorboard = self.jsonl = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.jsonl = open(self.path, "a", encoding="utf-8")
        if sys.stderr.isatty():
            self.bar = tqdm(
                total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True
            )
        if tracker == "wandb":
            import wandb  # checked by the CLI; WANDB_MODE=offline logs without network

            self.tracker = wandb.init(
                project=project,
                id=run_id or None,
                name=run_name or run_id or None,
                resume="allow",
                dir=str(run_dir),
                config=run_config or {},
            )
        elif tracker == "swanlab":
            import swanlab  # checked by the CLI

            self.tracker = swanlab.init(
                project=project,
                experiment_name=run_name or run_id or None,
                config=run_config or {},
                logdir=str(Path(run_dir) / "swanlog"),
            )
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional
            SummaryWriter = None
        if SummaryWriter is not None or tracker == "tensorboard":
            if SummaryWriter is None:
                raise ValueError(
                    "--tracker tensorboard needs the tensorboard package: pip install tensorboard"
                )
            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def _append(self, line: str) -> None:
        """One whole line or nothing: a failed write is cut back off the file."""
        position = self.jsonl.tell()
        try:
            self.jsonl.write(line)
            self.jsonl.flush()
        except OSError as error:
            try:
                self.jsonl.truncate(position)
            except OSError:
                pass  # readers skip a line cut short
            raise MetricsError(
                f"writing {self.path} failed: {describe_write_error(error, self.path.parent)}"
            ) from error

    def record(
        self, values: dict[str, Any], line: Optional[str] = None, advance_to: Optional[int] = None
    ) -> None:
        """Append `values` (must hold "step") to the sinks and show `line`."""
        if not self.enabled:
            return
        self._append(json.dumps(values) + "\n")
        step = values["step"]
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tracker is not None:
            self.tracker.log(numbers, step=step)
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.bar is not None and advance_to is not None:
            self.bar.update(advance_to - self.bar.n)
            if "loss" in values:
                self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")
        if line:
            self.print(line)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if not self.enabled:
            return
        self.enabled = False
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            self.tracker.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        try:
            self.jsonl.close()
        except OSError:
            pass  # every record was flushed (or cut back) when written


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Train (and validation) loss against the optimizer step, as a PNG; None without
    matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, val = [], []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            val.append((record["step"], record["val_loss"]))
    if not train:
        return None
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    axes.plot(*zip(*train), label="train loss")
    if val:
        axes.plot(*zip(*val), "o-", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return Path(png_path)
