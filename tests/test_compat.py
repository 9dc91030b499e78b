"""Each private torch API behind minimind_fast.compat still exists in the installed torch and
behaves as the package relies on; a torch upgrade that breaks one fails here, by name."""

import torch
import torch.nn as nn

from minimind_fast import compat


def test_grouped_mm_matches_per_group_matmul():
    grouped_mm = compat.grouped_mm()
    assert grouped_mm is not None, (
        "torch._grouped_mm is gone: the MoE layer falls back to its split loop"
    )
    x = torch.randn(10, 16)
    weight = torch.randn(3, 16, 8)  # (groups, K, M)
    ends = torch.tensor([4, 4, 10], dtype=torch.int32)  # group 1 is empty
    out = grouped_mm(x, weight, offs=ends)
    expected = torch.cat([x[:4] @ weight[0], x[4:10] @ weight[2]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_has_kernel_for_known_and_unknown_keys():
    assert compat.has_kernel_for("aten::add.Tensor", "CPU")
    assert not compat.has_kernel_for("aten::add.Tensor", "FPGA")


def test_ddp_ignore_records_names():
    model = nn.Linear(2, 2)
    model.register_buffer("table", torch.zeros(2), persistent=False)
    assert compat.ddp_ignore(model, ["table"]), (
        "DDP lost _set_params_and_buffers_to_ignore_for_model"
    )
    assert "table" in model._ddp_params_and_buffers_to_ignore


def test_fused_adamw_skips_on_found_inf():
    parameter = nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([parameter], lr=0.1, fused=True)
    assert compat.optimizer_takes_found_inf(optimizer)
    parameter.grad = torch.ones(4)
    optimizer.grad_scale, optimizer.found_inf = None, torch.ones(())
    optimizer.step()
    del optimizer.grad_scale, optimizer.found_inf
    assert torch.equal(parameter.detach(), torch.ones(4)), "found_inf=1 must skip the fused update"
    parameter.grad = torch.ones(4)
    optimizer.step()
    assert not torch.equal(parameter.detach(), torch.ones(4))


def test_abort_process_group_exists():
    import torch.distributed as dist

    assert hasattr(dist.distributed_c10d, "_abort_process_group"), (
        "torch.distributed lost _abort_process_group: a failed CUDA rank will wait for its peers "
        "at exit"
    )
