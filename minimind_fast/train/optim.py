"""Optimizer construction and the optimizer step: AdamW parameter groups, gradient clipping,
skipping non-finite steps without a host sync, and activation checkpointing.

Decay groups: "matrices" follows nanoGPT's `configure_optimizers` (no weight decay on norms,
biases or embeddings); "all" is MiniMind's `optim.AdamW(model.parameters(), lr)`, one group
that decays every tensor. The step follows PyTorch's AMP recipe (unscale, then clip, then step).
Non-finite steps are skipped on the device: the fused AdamW kernel takes a `found_inf` flag (the
same mechanism GradScaler uses), so float32/bfloat16 steps with NaN/inf gradients leave the
weights and the optimizer state untouched without a `.item()` per step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .. import compat


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def parameter_groups(model: nn.Module, weight_decay: float,
                     decay_on: str = "matrices") -> list[dict]:
    """AdamW groups. decay_on="matrices": decayed weight matrices, and undecayed norms, biases and
    embeddings (two groups); "all": one group, every parameter decayed.

    A tied lm_head shares the embedding's tensor; parameters are deduplicated by identity (as
    `model.parameters()` does) and the embedding (hence the tied head) is a matrix not decayed.
    """
    if decay_on not in ("matrices", "all"):
        raise ValueError(f"decay_on={decay_on!r}: use 'matrices' or 'all'")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, parameter in model.named_parameters():
        if id(parameter) in seen or not parameter.requires_grad:
            continue
        seen.add(id(parameter))
        matrix = parameter.dim() >= 2 and id(parameter) not in embeddings
        (decay if matrix or decay_on == "all" else no_decay).append(parameter)
    if decay_on == "all":
        return [{"params": decay, "weight_decay": weight_decay}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), decay_on: str = "matrices",
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA kernels exist in torch >= 2.4) over `parameter_groups`.

    Loading a saved state keeps this run's betas and weight decay (the flags of the resumed
    invocation); only the moments, step counts and learning rate come from the checkpoint.
    """
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay, decay_on), lr=learning_rate,
                                  betas=tuple(betas), eps=eps, fused=True)
    configured = [(group["betas"], group["weight_decay"]) for group in optimizer.param_groups]

    def keep_configured(loaded: torch.optim.Optimizer) -> None:
        for group, (group_betas, group_decay) in zip(loaded.param_groups, configured):
            group["betas"], group["weight_decay"] = group_betas, group_decay

    optimizer.register_load_state_dict_post_hook(keep_configured)
    return optimizer


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def clip_and_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float):
    """Unscale (float16), clip to `grad_clip` (0 disables), step unless a gradient is non-finite,
    zero the gradients. Returns (grad_norm, skipped): 0-d float32 tensors on the device, the norm
    taken before clipping, skipped = 1.0 when the step was skipped. No host sync on the fused path.
    """
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True).float()
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, grad_norm, foreach=True)
    skipped = (~torch.isfinite(grad_norm)).float()
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips on inf/NaN and lowers the scale
        scaler.update()
    elif compat.optimizer_takes_found_inf(optimizer):
        optimizer.grad_scale, optimizer.found_inf = None, skipped  # read by the fused kernel
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif bool(skipped == 0):  # a non-fused optimizer: one host sync per optimizer step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def apply_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in the backward pass (non-reentrant
    torch.utils.checkpoint; the RNG state is replayed, so dropout masks are the same)."""
    for block in unwrap_model(model).model.layers:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
