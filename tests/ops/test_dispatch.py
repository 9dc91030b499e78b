"""ops/dispatch.py: the precedence of backend choices, and each op's "auto" rule."""

import pytest
import torch

from minimind_fast import compat
from minimind_fast.ops import dispatch
from minimind_fast.ops.dispatch import (
    BACKEND_ENV,
    choose_backend,
    choose_grouped_linear_backend,
    choose_moe_experts_backend,
    choose_moe_route_backend,
    use_backend,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # the rules need no CUDA device


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def test_precedence_explicit_then_op_then_global_then_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert choose_moe_route_backend() == "torch"
    with use_backend("auto"):
        assert choose_moe_route_backend() == "ext"
        with use_backend("torch", op="moe_route"):
            assert choose_moe_route_backend() == "torch"
            assert choose_moe_route_backend("ext") == "ext"
            with use_backend("ext", op="moe_route"):
                assert choose_moe_route_backend() == "ext"
            assert choose_moe_route_backend() == "torch"
        assert choose_moe_route_backend() == "ext"
    assert choose_moe_route_backend() == "torch"
    assert dispatch._overrides == {}


def test_op_override_leaves_other_ops_alone():
    with use_backend("torch", op="moe_experts"):
        assert choose_moe_experts_backend(CUDA, torch.bfloat16, (64, 128)) == "torch"
        assert choose_moe_route_backend() == "ext"
        assert choose_grouped_linear_backend(CPU, torch.float32, (64, 128)) == "grouped_mm"


def test_global_torch_means_every_reference_and_triton_leaves_moe_ops_on_auto():
    with use_backend("torch"):
        assert choose_backend(CUDA) == "torch"
        assert choose_moe_route_backend() == "torch"
        assert choose_grouped_linear_backend(CPU, torch.float32, (64, 128)) == "torch"
        assert choose_moe_experts_backend(CUDA, torch.bfloat16, (64, 128)) == "torch"
    with use_backend("triton"):
        assert choose_moe_route_backend() == "ext"
        assert choose_grouped_linear_backend(CPU, torch.float32, (64, 128)) == "grouped_mm"
        assert choose_moe_experts_backend(CUDA, torch.bfloat16, (64, 128)) == "grouped"


def test_triton_ops_auto_rule():
    expected = "triton" if dispatch.triton_available() else "torch"
    assert choose_backend(CUDA) == expected
    assert choose_backend(CPU) == "torch"


@pytest.mark.parametrize(
    "device,dtype,dims,expected",
    [
        (CPU, torch.float32, (64, 128), "grouped_mm"),
        (CPU, torch.bfloat16, (64, 136), "grouped_mm"),  # 272-byte rows
        (CPU, torch.float32, (66, 128), "torch"),  # 264-byte rows: not 16-byte aligned
        (CPU, torch.float64, (64, 128), "torch"),
        (CUDA, torch.bfloat16, (64, 128), "grouped_mm"),
        (CUDA, torch.float32, (64, 128), "torch"),  # CUDA's grouped kernel is bf16 only
        (torch.device("meta"), torch.float32, (64, 128), "torch"),
    ],
)
def test_grouped_linear_auto_rule(device, dtype, dims, expected):
    assert choose_grouped_linear_backend(device, dtype, dims) == expected


@pytest.mark.parametrize(
    "device,dtype,dims,compiling,expected",
    [
        (CPU, torch.float32, (64, 128), False, "torch"),  # eager CPU: the split loop
        (CPU, torch.float32, (64, 128), True, "grouped"),
        (CPU, torch.bfloat16, (64, 128), True, "grouped"),
        (CPU, torch.float32, (66, 128), True, "torch"),
        (CPU, torch.float64, (64, 128), True, "torch"),
        (CUDA, torch.bfloat16, (64, 128), False, "grouped"),
        (CUDA, torch.float32, (64, 128), False, "torch"),
        (CUDA, torch.bfloat16, (64, 132), False, "torch"),  # 264-byte rows
    ],
)
def test_moe_experts_auto_rule(monkeypatch, device, dtype, dims, compiling, expected):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    assert choose_moe_experts_backend(device, dtype, dims) == expected


def test_without_grouped_mm_the_moe_ops_take_their_loops(monkeypatch):
    monkeypatch.setattr(compat, "grouped_mm", lambda: None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose_grouped_linear_backend(CUDA, torch.bfloat16, (64, 128)) == "torch"
    assert choose_moe_experts_backend(CUDA, torch.bfloat16, (64, 128)) == "torch"


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: use_backend("ext").__enter__(), "backend='ext' is not a backend; use one of auto"),
        (
            lambda: use_backend("triton", op="moe_route").__enter__(),
            "moe_route backend='triton' is not a backend; use one of auto, ext, torch",
        ),
        (lambda: use_backend("torch", op="rms_norm").__enter__(), "op='rms_norm' has no backend"),
        (
            lambda: choose_moe_experts_backend(CPU, torch.float32, (64, 128), "split"),
            "moe_experts backend='split' is not a backend; use one of auto, grouped, torch",
        ),
    ],
)
def test_bad_names_are_one_line_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
    assert dispatch._overrides == {}


def test_environment_variable_is_checked(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV}='cuda' is not a backend"):
        choose_moe_route_backend()
