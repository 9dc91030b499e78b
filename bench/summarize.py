"""Turn pytest-benchmark JSON (one file or several, merged) into a markdown results record:
where it ran, every target of the kernel (4), MoE (8) and training-loop (3) issues with its
measured ratio, and one table per benchmark group with rates, peak memory and the speed-up
against the group's baseline (eager / unfused / reference / MiniMind loop).

    python bench/summarize.py bench.json [more.json ...] [--out summary.md] [--merged all.json]

Ratios use median wall times; CUDA runs add a second column on the GPU-kernel basis (the device's
busy time per call from torch.profiler, without launch overhead). A target whose benchmarks were skipped or absent is "unmeasured"; a
target measured on the other kind of device than the one it is stated for is shown, marked
"n/a here". The standard library only, so it runs wherever the JSON is.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, Optional

BASELINE_IMPLS = ("eager", "unfused", "reference", "minimind_loop")


class Results:
    def __init__(self, documents: list[dict]):
        self.document = documents[0]
        by_name: dict[str, dict] = {}
        for document in documents:
            for bench in document.get("benchmarks", []):
                by_name[bench["name"]] = bench
        self.benchmarks = list(by_name.values())
        self.by_name = by_name
        self.env = self.document.get("machine_info", {}).get("minimind_fast", {})

    @property
    def device(self) -> str:
        return self.env.get("device", "cpu")

    basis = "wall"  # or "kernel": GPU busy time per call (extra_info gpu_kernel_s, CUDA runs only)

    def median(self, name: str) -> Optional[float]:
        bench = self.by_name.get(name)
        if not bench:
            return None
        if self.basis == "kernel":
            return bench.get("extra_info", {}).get("gpu_kernel_s")
        return bench["stats"]["median"]

    def gbps(self, name: str) -> Optional[float]:
        return self.extra(name, "gbps_kernel" if self.basis == "kernel" else "gbps")

    def tflops(self, name: str) -> Optional[float]:
        return self.extra(name, "tflops_kernel" if self.basis == "kernel" else "tflops")

    def extra(self, name: str, key: str):
        bench = self.by_name.get(name)
        return bench.get("extra_info", {}).get(key) if bench else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


class Target:
    def __init__(self, issue: int, what: str, devices: tuple[str, ...], compare: str, threshold: float,
                 measure: Callable[[Results], Optional[float]]):
        self.issue, self.what, self.devices = issue, what, devices
        self.compare, self.threshold, self.measure = compare, threshold, measure

    def met(self, value: float) -> bool:
        return {">=": value >= self.threshold, "<=": value <= self.threshold,
                "<": value < self.threshold}[self.compare]


def _targets() -> list[Target]:
    targets: list[Target] = []
    for h in (512, 768):
        base = f"test_rms_norm[h{h}-"
        targets += [
            Target(4, f"RMSNorm h{h} fwd+bwd: eager time / ours", ("cuda",), ">=", 1.5,
                   lambda r, b=base: ratio(r.median(b + "fwdbwd-eager]"), r.median(b + "fwdbwd-ours]"))),
            Target(4, f"RMSNorm h{h} fwd+bwd: torch.compile time / ours", ("cuda",), ">=", 1.0,
                   lambda r, b=base: ratio(r.median(b + "fwdbwd-compiled]"), r.median(b + "fwdbwd-ours]"))),
            Target(4, f"RMSNorm h{h} fwd: bandwidth / copy bandwidth of the same bytes", ("cuda",), ">=", 0.7,
                   lambda r, b=base, h=h: ratio(r.gbps(b + "fwd-ours]"), r.gbps(f"test_copy[h{h}]"))),
            Target(4, f"RMSNorm h{h} fwd+bwd: Liger time / ours", ("cuda",), ">=", 1.0,
                   lambda r, b=base: ratio(r.median(b + "fwdbwd-liger]"), r.median(b + "fwdbwd-ours]"))),
        ]
    targets += [
        Target(4, "cross-entropy V6400 fwd+bwd: eager time / ours", ("cuda",), ">=", 2.0,
               lambda r: ratio(r.median("test_cross_entropy[fwdbwd-eager]"), r.median("test_cross_entropy[fwdbwd-ours]"))),
        Target(4, "cross-entropy fwd+bwd: peak extra memory / one fp32 (N, V) buffer", ("cuda",), "<", 1.0,
               lambda r: ratio(r.extra("test_cross_entropy[fwdbwd-ours]", "peak_mem_bytes"),
                               r.extra("test_cross_entropy[fwdbwd-ours]", "fp32_nv_bytes"))),
        Target(4, "fused linear CE H768 V6400 N16384: peak memory ours / unfused", ("cuda", "cpu"), "<=", 0.25,
               _flce_memory_ratio),
        Target(4, "fused linear CE H768 V6400 (N as run): time ours / unfused", ("cuda",), "<=", 1.1,
               lambda r: ratio(r.median("test_fused_linear_cross_entropy[ours]"),
                               r.median("test_fused_linear_cross_entropy[unfused]"))),
    ]
    for e, k in ((4, 1), (4, 2), (8, 2), (64, 8)):
        case = f"E{e}k{k}"
        targets.append(Target(8, f"moe_route {case} fwd+bwd at T=8192: reference time / ours",
                              ("cpu",), ">=", 10.0, lambda r, c=case: _route_speedup(r, c)))
    for e, k in ((4, 1), (4, 2), (8, 2), (64, 8)):
        case = f"E{e}k{k}"
        targets.append(Target(8, f"moe_route {case} fwd at T=64k: time / bandwidth floor", ("cuda",), "<=", 2.0,
                              lambda r, c=case: _route_floor(r, c)))
    targets += [
        Target(8, "MoE train step / dense twin (demo sizes)", ("cpu",), "<=", 1.25,
               lambda r: ratio(r.median("test_train_step[demo_moe-fused-packed-eager]"),
                               r.median("test_train_step[demo_moe_dense-fused-packed-eager]"))),
        Target(8, "MoE train step / dense twin (minimind2-moe)", ("cuda",), "<=", 1.2,
               lambda r: ratio(r.median("test_train_step[minimind2-moe-fused-packed-eager]"),
                               r.median("test_train_step[minimind2-moe_dense-fused-packed-eager]"))),
    ]
    for preset in ("demo", "minimind2-small"):
        for data in ("packed", "padded"):
            targets.append(Target(3, f"train step {preset} {data}: FLOP rate / fp32 matmul", ("cpu",), ">=", 0.8,
                                  lambda r, p=preset, d=data: _step_vs_matmul(r, f"test_train_step[{p}-fused-{d}-eager]")))
    return targets


def _step_vs_matmul(r: Results, name: str) -> Optional[float]:
    """The step's FLOP rate over the matmul timed right next to it (else bench_baseline's)."""
    adjacent = r.extra(name, "matmul_tflops_adjacent") if r.basis == "wall" else None
    return ratio(r.tflops(name), adjacent or r.tflops("test_matmul[fp32]"))


def _flce_memory_ratio(r: Results) -> Optional[float]:
    """At the issue's N: the dedicated memory case where the profile runs a smaller N, else the main one."""
    dedicated = r.extra("test_fused_linear_cross_entropy_memory_at_issue_shape", "peak_mem_ratio")
    if dedicated is not None:
        return dedicated
    if r.extra("test_fused_linear_cross_entropy[ours]", "n") != 16384:
        return None
    return ratio(r.extra("test_fused_linear_cross_entropy[ours]", "peak_mem_bytes"),
                 r.extra("test_fused_linear_cross_entropy[unfused]", "peak_mem_bytes"))


def _route_speedup(r: Results, case: str) -> Optional[float]:
    """Reference time / ours: the interleaved measurement (harness.interleaved_ratio) when the run
    has it, else the two cases' medians (older records)."""
    ours = f"test_moe_route[{case}-fwdbwd-ours]"
    if r.extra(ours, "tokens") not in (None, 8192):
        return None  # the target is stated at T=8192
    interleaved = r.extra(ours, "reference_ratio_interleaved")
    if interleaved is not None:
        return interleaved
    return ratio(r.median(f"test_moe_route[{case}-fwdbwd-reference]"), r.median(ours))


def _route_floor(r: Results, case: str) -> Optional[float]:
    ours = f"test_moe_route[{case}-fwd-ours]"
    nbytes, copy_gbps = r.extra(ours, "bytes"), r.gbps("test_copy[large]")
    if nbytes is None or not copy_gbps or r.extra(ours, "tokens") != 65536:
        return None
    return ratio(r.median(ours), nbytes / (copy_gbps * 1e9))


TARGETS = _targets()


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def fmt_ratio(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3g}"


def rate(bench: dict, matmul_tflops: Optional[float] = None) -> str:
    extra = bench.get("extra_info", {})
    if "useful_tokens_per_s" in extra:
        text = f"{extra['useful_tokens_per_s']:,.0f} useful tok/s, {extra['tflops'] * 1e3:.3g} GFLOP/s"
        matmul_tflops = extra.get("matmul_tflops_adjacent") or matmul_tflops
        if matmul_tflops:
            text += f" ({extra['tflops'] / matmul_tflops:.0%} of matmul)"
        if "mfu" in extra:
            text += f", MFU {extra['mfu']:.1%}"
        return text
    if "gbps" in extra:
        return f"{extra['gbps']:.3g} GB/s"
    if "tflops" in extra:
        return f"{extra['tflops'] * 1e3:.3g} GFLOP/s"
    return ""


def header(r: Results) -> list[str]:
    info = r.document.get("machine_info", {})
    env = r.env
    cpu = info.get("cpu", {})
    commit = r.document.get("commit_info", {})
    device = env.get("gpu") or f"CPU: {cpu.get('brand_raw', info.get('processor', '?'))}, {cpu.get('count', '?')} cores"
    lines = [
        f"- date: {r.document.get('datetime', '?')}",
        f"- device: {device} ({env.get('threads', '?')} torch threads)",
        f"- torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, Python {info.get('python_version', '?')}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
        f"- default backend: {env.get('default_backend', '?')}; size profile: {env.get('size_profile', '?')}; "
        f"timed budget per case: {env.get('budget_s', '?')} s; TRITON_INTERPRET={int(bool(env.get('triton_interpret')))}",
    ]
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty tree)' if commit.get('dirty') else ''}")
    return lines


def targets_table(r: Results) -> list[str]:
    kernel_columns = r.device == "cuda"
    lines = ["| issue | target | wanted | measured | status |" + (" GPU-kernel basis | status |" if kernel_columns else ""),
             "|---|---|---|---|---|" + ("---|---|" if kernel_columns else "")]
    for target in TARGETS:
        cells = []
        for basis in ("wall", "kernel") if kernel_columns else ("wall",):
            r.basis = basis
            value = target.measure(r)
            if value is None:
                status = "unmeasured"
            elif r.device not in target.devices:
                status = f"n/a here ({'/'.join(target.devices)} target)"
            else:
                status = "met" if target.met(value) else "**unmet**"
            cells += [fmt_ratio(value), status]
        r.basis = "wall"
        lines.append(f"| #{target.issue} | {target.what} | {target.compare} {target.threshold:g} | "
                     + " | ".join(cells) + " |")
    return lines


def group_tables(r: Results) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for bench in r.benchmarks:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    matmul = r.extra("test_matmul[bf16]" if r.device == "cuda" else "test_matmul[fp32]", "tflops")
    lines: list[str] = []
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b["name"])
        baseline = _baseline(group, rows)
        cuda = r.device == "cuda"
        lines += ["", f"### {group}", "",
                  "| case | median | " + ("GPU kernel | " if cuda else "") + "IQR | rounds × iters | rate | "
                  "peak mem | speed-up vs " + (_param(baseline) if baseline else "—") + " |",
                  "|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
        for bench in rows:
            stats = bench["stats"]
            extra = bench.get("extra_info", {})
            peak = extra.get("peak_mem_mib")
            speedup = ratio(baseline["stats"]["median"], stats["median"]) if baseline else None
            kernel = f"{fmt_time(extra.get('gpu_kernel_s'))} | " if cuda else ""
            lines.append(f"| {_param(bench)} | {fmt_time(stats['median'])} | {kernel}{fmt_time(stats.get('iqr'))} | "
                         f"{stats['rounds']} × {stats.get('iterations', 1)} | {rate(bench, matmul)} | "
                         f"{'—' if peak is None else f'{peak:.4g} MiB'} | {fmt_ratio(speedup)} |")
    return lines


def _param(bench: dict) -> str:
    return bench.get("param") or bench["name"]


def _baseline(group: str, rows: list[dict]) -> Optional[dict]:
    if group.startswith("train_step "):
        wanted = f"{group.split(' ', 1)[1]}-fused-packed-eager"
        return next((b for b in rows if _param(b) == wanted), None)
    for bench in rows:
        if _param(bench).rsplit("-", 1)[-1] in BASELINE_IMPLS:
            return bench
    return None


def render(r: Results) -> str:
    lines = ["## Where", ""] + header(r)
    lines += ["", "## Targets", "", *targets_table(r), "", "## Results by group",
              "", "Rates from the median time; peak mem = extra memory the case allocates "
              "(CUDA: max_memory_allocated; CPU: allocator events from torch.profiler); "
              "\"of matmul\" = the step's FLOP rate over a plain matmul timed right after it "
              f"({'bf16' if r.device == 'cuda' else 'fp32'})."]
    lines += group_tables(r)
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output(s)")
    parser.add_argument("--out", help="write the markdown here (default: stdout)")
    parser.add_argument("--merged", help="also write the merged JSON here")
    args = parser.parse_args(argv)
    documents = []
    for path in args.json:
        try:
            with open(path) as handle:
                documents.append(json.load(handle))
        except (OSError, json.JSONDecodeError) as error:
            print(f"summarize: skipping {path}: {error}", file=sys.stderr)
    if not documents:
        print("summarize: no readable benchmark JSON", file=sys.stderr)
        return 1
    results = Results(documents)
    if args.merged:
        merged = dict(results.document, benchmarks=results.benchmarks)
        with open(args.merged, "w") as handle:
            json.dump(merged, handle, indent=1)
    text = render(results)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
