"""Model configuration: MiniMind2 defaults, MiniMind-3 switches, named presets.

Field names follow MiniMind2's `MiniMindConfig` (model/model_minimind.py) so a config dict
round-trips between the two projects. The `minimind3*` presets reproduce MiniMind-3's current
defaults for any hidden size (its FFN width rule, eps, KV heads, q/k norm, MoE settings).
`validate()` turns every impossible combination into a one-line ValueError that names the value
and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional


def default_intermediate_size(hidden_size: int) -> int:
    """MiniMind2's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 64."""
    return 64 * math.ceil(hidden_size * 8 / 3 / 64)


def minimind3_intermediate_size(hidden_size: int) -> int:
    """MiniMind-3's SwiGLU width: pi times hidden, rounded up to a multiple of 64 (768 -> 2432)."""
    return 64 * math.ceil(hidden_size * math.pi / 64)


@dataclass
class MiniMindConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    intermediate_size: Optional[int] = None  # None: default_intermediate_size(hidden_size)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None  # YaRN: {"factor", "original_max_position_embeddings", ...}
    hidden_act: str = "silu"
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    qk_norm: bool = False  # MiniMind-3 / Qwen3: RMSNorm over head_dim on q and k
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # MoE (MiniMind names)
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.01
    seq_aux: bool = True
    norm_topk_prob: bool = True
    extra: dict = field(default_factory=dict)  # unknown keys from foreign configs, kept verbatim

    def __post_init__(self) -> None:
        if self.head_dim is None and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; pick a head count that divides it "
                    "(or set head_dim)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None and self.hidden_size > 0:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        self.validate()

    def validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            self._require_positive(name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; "
                "pick KV heads that divide the query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use 'silu'")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token = getattr(self, name)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"{name}={token} is outside the vocabulary [0, {self.vocab_size})")
        if self.use_moe:
            self._validate_moe()

    def _require_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")

    def _validate_moe(self) -> None:
        self._require_positive("n_routed_experts")
        self._require_positive("num_experts_per_tok")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts="
                f"{self.n_routed_experts}; route each token to at most that many experts"
            )
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func={self.scoring_func!r} must be 'softmax' or 'sigmoid'")
        if self.aux_loss_alpha < 0:
            raise ValueError(f"aux_loss_alpha={self.aux_loss_alpha} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MiniMindConfig":
        """A config from our `to_dict()`, MiniMind2's config.json or MiniMind-3's; keys without a
        field go to `extra`. Told apart by their keys: MiniMind-3 names its MoE fields
        num_experts / moe_intermediate_size / router_aux_loss_coef (translated here), only this
        package writes qk_norm and extra, and anything else is MiniMind2's. MiniMind2
        renormalised the top-k weights only for top-k > 1, so its top-1 configs read as
        norm_topk_prob=False: the same computation under the rule of moe_route (renormalise
        whenever norm_topk_prob, as MiniMind-3 and Qwen3-MoE do)."""
        values = dict(values)
        if _MINIMIND3_KEYS & values.keys():
            values = _from_minimind3(values)
        elif not _OWN_KEYS & values.keys() and values.get("num_experts_per_tok") == 1:
            values["norm_topk_prob"] = False
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known}
        kwargs.setdefault("extra", {}).update(extra)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "MiniMindConfig":
        if "hidden_size" in changes or "num_attention_heads" in changes:
            changes.setdefault("head_dim", None)
        if "hidden_size" in changes:
            changes.setdefault("intermediate_size", None)
        return dataclasses.replace(self, **changes)


# Keys only MiniMind-3's config writes (MiniMind2 and this package say n_routed_experts,
# intermediate_size, aux_loss_alpha), and fields only this package writes.
_MINIMIND3_KEYS = frozenset({"num_experts", "moe_intermediate_size", "router_aux_loss_coef"})
_OWN_KEYS = frozenset({"qk_norm", "extra"})


def _from_minimind3(values: dict[str, Any]) -> dict[str, Any]:
    """MiniMind-3's config dict in our field names (model/model_minimind.py): q/k RMSNorm in every
    attention; MoE experts of width moe_intermediate_size, no shared expert, the token-level
    balance loss weighted by router_aux_loss_coef."""
    values = dict(values)
    values.setdefault("qk_norm", True)
    values.setdefault("n_shared_experts", 0)
    values.setdefault("seq_aux", False)
    if "num_experts" in values:
        values["n_routed_experts"] = values.pop("num_experts")
    if "router_aux_loss_coef" in values:
        values["aux_loss_alpha"] = values.pop("router_aux_loss_coef")
    expert_width = values.pop("moe_intermediate_size", None)
    if values.get("use_moe") and expert_width is not None:
        values["intermediate_size"] = expert_width  # a MoE model has no dense FFN
    return values


# MiniMind-3's config defaults (model/model_minimind.py): head_dim = hidden // heads; the MoE
# fields apply when use_moe is set (4 experts, top-1, no shared expert, token-level aux loss).
_MINIMIND3 = dict(
    hidden_size=768,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    qk_norm=True,
    n_routed_experts=4,
    num_experts_per_tok=1,
    n_shared_experts=0,
    aux_loss_alpha=5e-4,
    seq_aux=False,
    norm_topk_prob=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    # A few M parameters: trains visibly in minutes on 2 CPU cores.
    "demo": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    # MiniMind2 (its config defaults, with 512/8, 768/16 and the 640/8 MoE of its release)
    "minimind2-small": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2
    ),
    "minimind2": dict(
        hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2
    ),
    "minimind2-moe": dict(
        hidden_size=640,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        use_moe=True,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
    ),
    # MiniMind-3: also what MiniMind's own size flags build without --preset (train/cli.py)
    "minimind3": dict(_MINIMIND3),
    "minimind3-moe": dict(_MINIMIND3, use_moe=True),
}
# Presets whose FFN width is MiniMind-3's pi rule of their (possibly overridden) hidden size.
_FFN_WIDTH_RULES = {
    "minimind3": minimind3_intermediate_size,
    "minimind3-moe": minimind3_intermediate_size,
}


def get_preset(name: str, **overrides: Any) -> MiniMindConfig:
    """The named preset with `overrides` applied (None values are ignored). Sizes the preset
    does not fix (head_dim, intermediate_size) follow its family's rule for the final hidden
    size."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if name in _FFN_WIDTH_RULES and "intermediate_size" not in values:
        values["intermediate_size"] = _FFN_WIDTH_RULES[name](values["hidden_size"])
    return MiniMindConfig(**values)
