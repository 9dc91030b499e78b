"""Every Triton kernel compiles ahead of time for Hopper (sm_90a: H100/H200), on a CPU-only machine.

The interpreter tests (TRITON_INTERPRET=1) never run Triton's GPU compiler, so a kernel that the
real pipeline rejects (a layout, a type, a size ptxas refuses) would first fail on a GPU. This test
runs that pipeline, ttir -> ttgir -> llir -> ptx -> cubin with the ptxas bundled in the triton
wheel, for `GPUTarget("cuda", 90, 32)` through `triton.compile(ASTSource(...))`: no driver, no GPU.

The launch arguments come from the launchers themselves, not from copied numbers: each case calls
the real launcher (kernels/rmsnorm.py, rope.py, cross_entropy.py) on meta tensors with the
`_*_kernel` globals swapped for a recorder and an H100's 132 SMs, then specialises the recorded
arguments the way `JITFunction.run` does (Triton's `native_specialize_impl`: 16-byte aligned
pointers and 16-divisible ints carry tt.divisibility, an int equal to 1 becomes a constexpr) and
compiles with the launcher's num_warps. Each case asserts a cubin for sm_90 holding the kernel, and
that its shared memory, threads and registers fit one sm_90 block.

Under TRITON_INTERPRET=1 `@triton.jit` yields interpreter functions that cannot be compiled, so the
compiles run in child processes without it (this file is also their script, see `_worker_main`),
with TRITON_CACHE_DIR in a pytest tmp dir. Skipped, with the reason, where triton has no nvidia
backend or ptxas, or where this compile path does not work at all (a trivial kernel fails).
The Triton counterpart of tests/test_cuda_sources.py (nvcc for csrc/cuda); the specialisation
follows triton/runtime/jit.py (`JITFunction._pack_args`).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # about 90 compiles in 2 child processes

ROOT = pathlib.Path(__file__).resolve().parents[2]
# H100 SXM and H200 both have 132 SMs (the persistent RMSNorm backward sizes its grid by it)
SM90_SMS = 132
SM90_MAX_SHARED = 227 * 1024  # opt-in shared memory per block on sm_90
SM90_MAX_THREADS = 1024
SM90_REGISTERS_PER_SM = 64 * 1024
BATCH, SEQ = 16, 512  # rows = B*T of a MiniMind pretraining step
Q_HEADS, KV_HEADS = 8, 2  # MiniMind2's attention (GQA)

DTYPES = ("fp32", "bf16", "fp16")
RMS_NORM_OPS = (
    "rms_norm_forward",
    "add_rms_norm_forward",
    "rms_norm_backward",
    "add_rms_norm_backward",
)
ROPE_OPS = ("rope_forward", "rope_backward")
# loss only / loss + dlogits / every option (label smoothing, z-loss, per-row gradient scale)
CROSS_ENTROPY_FORWARD_OPS = (
    "cross_entropy_forward_loss",
    "cross_entropy_forward_grad",
    "cross_entropy_forward_all",
)
CASES = (
    [
        (op, dtype, hidden)
        for op in RMS_NORM_OPS
        for dtype in DTYPES
        for hidden in (512, 768, 4096, 16384)
    ]
    + [(op, dtype, head_dim) for op in ROPE_OPS for dtype in DTYPES for head_dim in (64, 128)]
    # 6400: MiniMind's vocab; 32000: Llama's; 151936: Qwen's, above one block: the looped path
    + [
        (op, dtype, vocab)
        for op in CROSS_ENTROPY_FORWARD_OPS
        for dtype in DTYPES
        for vocab in (6400, 32000, 151936)
    ]
    + [("cross_entropy_backward", dtype, vocab) for dtype in DTYPES for vocab in (6400, 32000)]
)
KERNEL_MODULES = ("rmsnorm", "rope", "cross_entropy")
WORKER_TIMEOUT_S = 600


def case_id(case) -> str:
    op, dtype, size = case
    return f"{op}-{dtype}-{size}"


# --------------------------------------------------------------------------- child process side


def _launch(op: str, dtype_name: str, size: int) -> None:
    """Call the launcher of one case on meta tensors (the kernel globals are recorders by now)."""
    import torch

    from minimind_fast.kernels import cross_entropy, rmsnorm, rope

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    meta = dict(device="meta")
    if op in RMS_NORM_OPS:
        x = torch.empty(BATCH, SEQ, size, dtype=dtype, **meta)
        weight = torch.empty(size, dtype=torch.float32, **meta)  # AMP: fp32 parameters
        residual = torch.empty_like(x) if op.startswith("add_") else None
        if op.endswith("_forward"):
            rmsnorm.rms_norm_forward(x, weight, 1e-5, residual=residual)
        else:
            rstd = torch.empty(BATCH, SEQ, dtype=torch.float32, **meta)
            rmsnorm.rms_norm_backward(torch.empty_like(x), x, weight, rstd, dresidual=residual)
    elif op in ROPE_OPS:
        q = torch.empty(BATCH, SEQ, Q_HEADS * size, dtype=dtype, **meta).view(
            BATCH, SEQ, Q_HEADS, size
        )
        k = torch.empty(BATCH, SEQ, KV_HEADS * size, dtype=dtype, **meta).view(
            BATCH, SEQ, KV_HEADS, size
        )
        cos = torch.empty(SEQ, size, dtype=torch.float32, **meta)
        launcher = rope.rope_forward if op == "rope_forward" else rope.rope_backward
        launcher(q, k, cos, torch.empty_like(cos))
    else:
        logits = torch.empty(BATCH * SEQ, size, dtype=dtype, **meta)
        if op == "cross_entropy_backward":
            scale = torch.empty((), dtype=torch.float32, **meta)
            cross_entropy.cross_entropy_backward(logits, scale)
            return
        targets = torch.empty(BATCH * SEQ, dtype=torch.int64, **meta)
        every_option = op == "cross_entropy_forward_all"
        cross_entropy.cross_entropy_forward(
            logits,
            targets,
            -100,
            0.1 if every_option else 0.0,
            1e-4 if every_option else 0.0,
            compute_grad=op != "cross_entropy_forward_loss",
            row_scale=torch.empty(BATCH * SEQ, dtype=torch.float32, **meta)
            if every_option
            else None,
        )


def _record_launches(case):
    """[(kernel, args, kwargs)] of the launches the case's launcher makes."""
    from triton.runtime.jit import JITFunction

    import minimind_fast.kernels.launch as launch
    from minimind_fast.kernels import cross_entropy, rmsnorm, rope

    calls, saved = [], []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    saved.append((launch, "sm_count", launch.sm_count))
    launch.sm_count = lambda device: SM90_SMS
    for module in (rmsnorm, rope, cross_entropy):
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                saved.append((module, name, value))
    try:
        for module, name, value in saved[1:]:
            setattr(module, name, Recorder(value))
        _launch(*case)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    return calls


def _specialise(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) as JITFunction.run builds them for these
    arguments."""
    try:
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        from triton._C.libtriton import native_specialize_impl
    names = [param.name for param in kernel.params]
    bound = dict(zip(names, args))
    bound.update({key: value for key, value in kwargs.items() if key in names})
    options = {key: value for key, value in kwargs.items() if key not in names}
    unknown = set(options) - set(vars(backend.parse_options(dict(options))))
    if unknown:  # JITFunction.run raises on these too
        raise KeyError(
            f"{kernel.__name__}: launch keywords {sorted(unknown)} are neither parameters "
            "nor options"
        )
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = bound[param.name] if param.name in bound else param.default
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", value
            continue
        kind, key = native_specialize_impl(
            backend,
            value,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = value
        elif isinstance(key, str) and key:
            attrs[(index,)] = backend.parse_attr(key)
    return signature, constexprs, attrs, options


def _tool(name: str):
    """Path of a tool bundled with triton's nvidia backend (ptxas, cuobjdump), or None."""
    try:
        from triton import knobs

        return getattr(knobs.nvidia, name.replace("-", "_")).path
    except Exception:
        import triton

        path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        return str(path) if os.access(path, os.X_OK) else None


def _compile(kernel, signature, constexprs, attrs, options, workdir: pathlib.Path) -> dict:
    """Compile for sm_90 and describe the result: PTX entry/target, cubin, resources from ptxas
    and cuobjdump."""
    import contextlib
    import io
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas_log = io.StringIO()  # TRITON_DUMP_PTXAS_LOG=1 makes triton print `ptxas -v`'s report
    with contextlib.redirect_stdout(ptxas_log):
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", 90, 32),
            options=options,
        )
    ptx, cubin, metadata = compiled.asm["ptx"], compiled.asm["cubin"], compiled.metadata
    target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE)
    result = dict(
        name=metadata.name,
        num_warps=metadata.num_warps,
        shared=metadata.shared,
        ptx_entries=re.findall(r"\.visible\s+\.entry\s+(\w+)", ptx),
        ptx_target=target.group(1) if target else None,
        cubin_bytes=len(cubin),
        cubin_is_elf=cubin[:4] == b"\x7fELF",
        ptxas_log=ptxas_log.getvalue(),
    )
    for field, pattern in (
        ("registers", r"Used (\d+) registers"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
        ("stack", r"(\d+) bytes stack frame"),
    ):
        found = re.search(pattern, result["ptxas_log"])
        result[field] = (
            int(found.group(1)) if found else None
        )  # None: no log (a cache hit, an older triton)
    cuobjdump = _tool("cuobjdump")
    if cuobjdump:
        path = workdir / f"{metadata.name}.cubin"
        path.write_bytes(cubin)
        runs = [
            subprocess.run([cuobjdump, flag, str(path)], capture_output=True, text=True)
            for flag in ("-lelf", "-res-usage")
        ]  # -lelf names the cubin's arch; -res-usage its functions
        result["cuobjdump"] = "".join(run.stdout + run.stderr for run in runs)
        found = re.search(rf"Function {metadata.name}:\s*REG:(\d+)", result["cuobjdump"])
        if result["registers"] is None and found:
            result["registers"] = int(found.group(1))
    return result


def _worker_main(cases_path: str, out_path: str) -> None:
    """Child process: compile the cases listed in cases_path, write {case_id: result} to
    out_path."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", (
        "the compile worker must run without the interpreter"
    )
    import traceback

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    job = json.loads(pathlib.Path(cases_path).read_text())
    workdir = pathlib.Path(out_path).parent
    report = {"unavailable": None, "cases": {}, "kernels": {}, "negative_control": None}

    def write():
        pathlib.Path(out_path).write_text(json.dumps(report))

    @triton.jit
    def _probe_kernel(out_ptr):
        tl.store(out_ptr, 1.0)

    try:  # is this compile path there at all? (nvidia backend, ptxas, a trivial kernel compiles)
        from triton.backends import backends
        from triton.backends.nvidia.compiler import CUDABackend

        try:  # the specialisation JITFunction.run uses (triton >= 3.5)
            from triton.runtime.jit import native_specialize_impl  # noqa: F401
        except ImportError:
            from triton._C.libtriton import native_specialize_impl  # noqa: F401
        if "nvidia" not in backends:
            raise RuntimeError(f"no nvidia backend (backends: {sorted(backends)})")
        if not _tool("ptxas"):
            raise RuntimeError("no ptxas found (TRITON_PTXAS_PATH, triton/backends/nvidia/bin)")
        backend = CUDABackend(GPUTarget("cuda", 90, 32))
        _compile(_probe_kernel, {"out_ptr": "*fp32"}, {}, {}, {}, workdir)
    except Exception as error:  # noqa: BLE001 - any failure here means "cannot test", reported as the skip reason
        report["unavailable"] = f"triton {triton.__version__}: {type(error).__name__}: {error}"
        return write()

    for case in job["cases"]:
        entry = report["cases"][case_id(case)] = {}
        try:
            calls = _record_launches(case)
            entry["launches"] = len(calls)
            kernel, args, kwargs = calls[0]
            signature, constexprs, attrs, options = _specialise(kernel, args, kwargs, backend)
            entry.update(
                kernel=kernel.__name__,
                options=options,
                constexprs={kernel.params[i].name: v for (i,), v in constexprs.items()},
            )
            entry.update(_compile(kernel, signature, constexprs, attrs, options, workdir))
        except Exception:  # noqa: BLE001 - the parent fails this case with the traceback
            entry["error"] = traceback.format_exc()

    if job["inventory"]:
        from triton.runtime.jit import JITFunction

        import minimind_fast.kernels as kernels_package

        for module_name in KERNEL_MODULES:
            module = __import__(f"{kernels_package.__name__}.{module_name}", fromlist=["_"])
            report["kernels"][module_name] = sorted(
                name
                for name, value in vars(module).items()
                if isinstance(value, JITFunction) and name.endswith("_kernel")
            )

        @triton.jit
        def _negative_control_kernel(out_ptr):  # a non-power-of-two arange: no target compiles this
            tl.store(out_ptr + tl.arange(0, 3), 1.0)

        try:
            _compile(_negative_control_kernel, {"out_ptr": "*fp32"}, {}, {}, {}, workdir)
        except Exception as error:  # noqa: BLE001
            report["negative_control"] = f"{type(error).__name__}: {error}"
    write()


# --------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """Compile every case in child processes (2 at once); {"cases": {case_id: result}, ...}."""
    pytest.importorskip("triton")
    workers = max(1, min(2, os.cpu_count() or 1))
    base = tmp_path_factory.mktemp("triton_sm90")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    (
        base / "tmp"
    ).mkdir()  # TMPDIR: triton's ptxas temporaries (left behind when ptxas fails) stay in here
    env.update(
        TRITON_CACHE_DIR=str(base / "cache"),
        TRITON_HOME=str(base),
        TRITON_DUMP_PTXAS_LOG="1",
        TMPDIR=str(base / "tmp"),
    )
    running = []
    for index in range(workers):
        workdir = base / f"worker{index}"
        workdir.mkdir()
        (workdir / "cases.json").write_text(
            json.dumps({"cases": CASES[index::workers], "inventory": index == 0})
        )
        command = [sys.executable, __file__, str(workdir / "cases.json"), str(workdir / "out.json")]
        running.append(
            (
                workdir,
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
            )
        )
    finished = []
    for workdir, process in running:
        try:
            log, _ = process.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            log, _ = process.communicate()
            log += f"\n[the test killed this worker after {WORKER_TIMEOUT_S} s]"
        finished.append((workdir, process, log))
    merged = {"unavailable": None, "cases": {}, "kernels": {}, "negative_control": None}
    for workdir, process, log in finished:
        out = workdir / "out.json"
        assert process.returncode == 0 and out.exists(), (
            f"sm_90 compile worker died (exit {process.returncode}):\n{log[-4000:]}"
        )
        report = json.loads(out.read_text())
        if report["unavailable"]:
            pytest.skip(f"ahead-of-time compile for sm_90 unavailable: {report['unavailable']}")
        merged["cases"].update(report["cases"])
        merged["kernels"].update(report["kernels"])
        merged["negative_control"] = merged["negative_control"] or report["negative_control"]
    return merged


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_compiles_for_sm90(sm90, case):
    result = sm90["cases"][case_id(case)]
    assert "error" not in result, f"{case_id(case)} does not compile for sm_90:\n{result['error']}"
    name = result["kernel"]
    context = (
        f"{case_id(case)}: {name} constexprs={result['constexprs']} options={result['options']}"
    )
    assert result["launches"] == 1, context
    assert result["name"] == name and result["ptx_entries"] == [name], context
    assert result["ptx_target"] in ("sm_90", "sm_90a"), (
        f"{context}: PTX targets {result['ptx_target']}"
    )
    assert result["cubin_is_elf"] and result["cubin_bytes"] > 0, context
    if (
        "cuobjdump" in result
    ):  # an independent reader of the cubin finds the kernel, built for sm_90
        assert f"Function {name}:" in result["cuobjdump"] and "sm_90" in result["cuobjdump"], (
            result["cuobjdump"]
        )
    # fits one block of an sm_90 SM (otherwise the launch, not the compile, fails on the GPU)
    threads = result["num_warps"] * 32
    assert threads <= SM90_MAX_THREADS, f"{context}: {threads} threads"
    assert result["shared"] <= SM90_MAX_SHARED, (
        f"{context}: {result['shared']} bytes of shared memory"
    )
    if result["registers"] is not None:
        assert result["registers"] * threads <= SM90_REGISTERS_PER_SM, (
            f"{context}:\n{result['ptxas_log']}"
        )


def test_every_kernel_has_a_case(sm90):
    """A new `_*_kernel` in a kernel module must get a case here (helpers compile inside their
    callers)."""
    compiled = {result["kernel"] for result in sm90["cases"].values() if "error" not in result}
    assert set(sm90["kernels"]) == set(KERNEL_MODULES)
    for module_name, kernel_names in sm90["kernels"].items():
        assert kernel_names, f"no _*_kernel found in kernels/{module_name}.py"
        missing = set(kernel_names) - compiled
        assert not missing, f"kernels/{module_name}.py: {sorted(missing)} not compiled by any case"


def test_compile_errors_are_caught(sm90):
    """The harness reports a kernel that does not compile (so the cases above can fail)."""
    assert sm90["negative_control"] is not None, "a kernel with tl.arange(0, 3) compiled"
    assert "power of 2" in sm90["negative_control"] or "arange" in sm90["negative_control"], sm90[
        "negative_control"
    ]


if __name__ == "__main__":
    _worker_main(*sys.argv[1:3])
