"""Turn pytest-benchmark JSON (one file or several, merged) into a markdown results record:
where it ran, every target with its measured value, a summary of ours vs eager vs compiled per
benchmark group, and one table per group with rates, peak memory and the speed-up against the
group's baseline (eager / unfused / reference / MiniMind's loop).

    python bench/summarize.py bench.json [more.json ...] [--out summary.md] [--merged all.json]
    python bench/summarize.py bench.json --brief     # where + targets + summary (make bench)

Ratios use median wall times, except where a case records a ratio timed in alternating blocks
(harness.interleaved_ratio: the train step against the matmul, moe_route against its reference,
our trainer against MiniMind's stand-in). CUDA runs add a second column on the GPU-kernel basis
(the device's busy time per call from torch.profiler, without launch overhead). A target whose
benchmarks were skipped or absent is "unmeasured"; one measured on the other kind of device
than it is stated for is shown, marked "n/a here". The standard library only, so it runs
wherever the JSON is.
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
    def __init__(self, area: str, what: str, devices: tuple[str, ...], compare: str,
                 threshold: float, measure: Callable[[Results], Optional[float]]):
        self.area, self.what, self.devices = area, what, devices
        self.compare, self.threshold, self.measure = compare, threshold, measure

    def met(self, value: float) -> bool:
        return {">=": value >= self.threshold, "<=": value <= self.threshold,
                "<": value < self.threshold}[self.compare]


def _times(slow: str, fast: str) -> Callable[[Results], Optional[float]]:
    """Median time of case `slow` / median time of case `fast`."""
    return lambda r: ratio(r.median(slow), r.median(fast))


def _targets() -> list[Target]:
    cuda, cpu, targets = ("cuda",), ("cpu",), []
    for h in (512, 768):
        norm = f"test_rms_norm[h{h}-"
        targets += [
            Target("kernels", f"RMSNorm h{h} fwd+bwd: eager time / ours", cuda, ">=", 1.5,
                   _times(norm + "fwdbwd-eager]", norm + "fwdbwd-ours]")),
            Target("kernels", f"RMSNorm h{h} fwd+bwd: torch.compile time / ours", cuda, ">=", 1.0,
                   _times(norm + "fwdbwd-compiled]", norm + "fwdbwd-ours]")),
            Target("kernels", f"RMSNorm h{h} fwd: bandwidth / copy bandwidth of the same bytes",
                   cuda, ">=", 0.7,
                   lambda r, b=norm, h=h: ratio(r.gbps(b + "fwd-ours]"),
                                                r.gbps(f"test_copy[h{h}]"))),
            Target("kernels", f"RMSNorm h{h} fwd+bwd: Liger time / ours", cuda, ">=", 1.0,
                   _times(norm + "fwdbwd-liger]", norm + "fwdbwd-ours]")),
        ]
    ce, flce = "test_cross_entropy[fwdbwd-", "test_fused_linear_cross_entropy["
    targets += [
        Target("kernels", "cross-entropy V6400 fwd+bwd: eager time / ours", cuda, ">=", 2.0,
               _times(ce + "eager]", ce + "ours]")),
        Target("kernels", "cross-entropy fwd+bwd: peak extra memory / one fp32 (N, V) buffer",
               cuda, "<", 1.0, lambda r: ratio(r.extra(ce + "ours]", "peak_mem_bytes"),
                                               r.extra(ce + "ours]", "fp32_nv_bytes"))),
        Target("kernels", "fused linear CE H768 V6400 N16384: peak memory ours / unfused",
               ("cuda", "cpu"), "<=", 0.25, _flce_memory_ratio),
        Target("kernels", "fused linear CE H768 V6400 (N as run): time ours / unfused", cuda,
               "<=", 1.1, _times(flce + "ours]", flce + "unfused]")),
    ]
    for e, k in ((4, 1), (4, 2), (8, 2), (64, 8)):
        targets.append(Target("MoE", f"moe_route E{e}k{k} fwd+bwd at T=8192: reference time / "
                              "ours", cpu, ">=", 10.0,
                              lambda r, c=f"E{e}k{k}": _route_speedup(r, c)))
    for e, k in ((4, 1), (4, 2), (8, 2), (64, 8)):
        targets.append(Target("MoE", f"moe_route E{e}k{k} fwd at T=64k: time / bandwidth floor",
                              cuda, "<=", 2.0, lambda r, c=f"E{e}k{k}": _route_floor(r, c)))
    step = "test_train_step[{}-fused-packed-{}]".format
    targets += [
        Target("MoE", "MoE train step / dense twin (demo sizes)", cpu, "<=", 1.25,
               lambda r: _step_times(r, step("demo_moe", "eager"),
                                     step("demo_moe_dense", "eager"))),
        Target("MoE", "MoE train step / dense twin (minimind2-moe)", cuda, "<=", 1.2,
               _times(step("minimind2-moe", "eager"), step("minimind2-moe_dense", "eager"))),
        Target("training step", "demo packed, eager (auto's pick for the demo run): FLOP rate / "
               "fp32 matmul", cpu, ">=", 0.6, lambda r: _step_vs_matmul(r, step("demo", "eager"))),
        Target("training step", "minimind2-small packed, compiled (auto's pick for its runs): "
               "FLOP rate / fp32 matmul", cpu, ">=", 0.9,
               lambda r: _step_vs_matmul(r, step("minimind2-small", "compiled"))),
        Target("trainer", "useful tokens/s, this trainer / MiniMind's trainer (stand-in), "
               "h512 L8 S512 B8, bundled corpus", ("cpu", "cuda"), ">=", 3.0,
               lambda r: r.extra("test_minimind_trainer", "useful_tokens_per_s_ratio")),
    ]
    return targets


def _step_vs_matmul(r: Results, name: str) -> Optional[float]:
    """The step's FLOP rate over the matmul's, timed in alternating blocks (older records: over
    the matmul timed right after it, else bench_baseline's)."""
    if r.basis == "wall":
        interleaved = r.extra(name, "fraction_of_matmul")
        if interleaved is not None:
            return interleaved
        adjacent = r.extra(name, "matmul_tflops_adjacent")
        if adjacent:
            return ratio(r.tflops(name), adjacent)
    return ratio(r.tflops(name), r.tflops("test_matmul[fp32]"))


def _step_times(r: Results, slow: str, fast: str) -> Optional[float]:
    """Step time of `slow` / step time of `fast`, each measured in matmul times (FLOPs over the
    fraction of the matmul rate, both paired with matmuls) where the run has them: a load change
    between the two cases then cancels; else the medians."""
    def in_matmuls(name: str) -> Optional[float]:
        fraction = r.extra(name, "fraction_of_matmul") if r.basis == "wall" else None
        return ratio(r.extra(name, "flops"), fraction)

    paired = ratio(in_matmuls(slow), in_matmuls(fast))
    return paired if paired is not None else ratio(r.median(slow), r.median(fast))


def _flce_memory_ratio(r: Results) -> Optional[float]:
    """At N=16384: the dedicated memory case where the profile runs a smaller N, else the main
    one."""
    dedicated = r.extra("test_fused_linear_cross_entropy_memory_n16384", "peak_mem_ratio")
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
        text = (f"{extra['useful_tokens_per_s']:,.0f} useful tok/s, "
                f"{extra['tflops'] * 1e3:.3g} GFLOP/s")
        if "useful_tflops" in extra:
            text += f" ({extra['useful_tflops'] * 1e3:.3g} useful)"
        fraction = extra.get("fraction_of_matmul")
        if fraction is None and (extra.get("matmul_tflops_adjacent") or matmul_tflops):
            fraction = extra["tflops"] / (extra.get("matmul_tflops_adjacent") or matmul_tflops)
        if fraction is not None:
            text += f", {fraction:.0%} of matmul"
        if "mfu" in extra:
            text += f", MFU {extra['mfu']:.1%}"
        if "compile_s" in extra:
            text += f", compiled in {extra['compile_s']:.3g} s"
        return text
    if "gbps" in extra:
        return f"{extra['gbps']:.3g} GB/s"
    if "tflops" in extra:
        return f"{extra['tflops'] * 1e3:.3g} GFLOP/s"
    return ""


def header(r: Results) -> list[str]:
    info, env = r.document.get("machine_info", {}), r.env
    cpu = info.get("cpu", {})
    commit = r.document.get("commit_info", {})
    device = env.get("gpu") or (f"CPU: {cpu.get('brand_raw', info.get('processor', '?'))}, "
                                f"{cpu.get('count', '?')} cores")
    lines = [
        f"- date: {r.document.get('datetime', '?')}",
        f"- device: {device} ({env.get('threads', '?')} torch threads)",
        f"- torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, "
        f"Python {info.get('python_version', '?')}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
        f"- default backend: {env.get('default_backend', '?')}; size profile: "
        f"{env.get('size_profile', '?')}; timed budget per case: {env.get('budget_s', '?')} s; "
        f"TRITON_INTERPRET={int(bool(env.get('triton_interpret')))}",
    ]
    if commit.get("id"):
        dirty = " (dirty tree)" if commit.get("dirty") else ""
        lines.append(f"- commit: {commit['id'][:12]}{dirty}")
    return lines


def targets_table(r: Results) -> list[str]:
    kernel_columns = r.device == "cuda"
    lines = ["| area | target | wanted | measured | status |"
             + (" GPU-kernel basis | status |" if kernel_columns else ""),
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
        lines.append(f"| {target.area} | {target.what} | {target.compare} {target.threshold:g} | "
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
                  "| case | median | " + ("GPU kernel | " if cuda else "")
                  + "IQR | rounds × iters | rate | "
                  "peak mem | speed-up vs " + (_param(baseline) if baseline else "—") + " |",
                  "|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
        for bench in rows:
            stats = bench["stats"]
            extra = bench.get("extra_info", {})
            peak = extra.get("peak_mem_mib")
            speedup = ratio(baseline["stats"]["median"], stats["median"]) if baseline else None
            kernel = f"{fmt_time(extra.get('gpu_kernel_s'))} | " if cuda else ""
            lines.append(f"| {_param(bench)} | {fmt_time(stats['median'])} | {kernel}"
                         f"{fmt_time(stats.get('iqr'))} | "
                         f"{stats['rounds']} × {stats.get('iterations', 1)} | "
                         f"{rate(bench, matmul)} | "
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


# Groups whose "ours" is the trainer's pick for the preset's default run (--use_compile auto).
AUTO_PICK = {"demo": "eager", "minimind2-small": "compiled"}


def _summary_row(group: str, rows: list[dict]) -> Optional[tuple[str, ...]]:
    """(group, ours, eager, compiled, eager / ours, compiled / ours) for groups that have them."""
    by_impl = {_param(b).rsplit("-", 1)[-1]: b["stats"]["median"] for b in rows}
    if group.startswith("train_step "):
        preset = group.split(" ", 1)[1]
        by_mode = {mode: next((b["stats"]["median"] for b in rows
                               if _param(b) == f"{preset}-fused-packed-{mode}"), None)
                   for mode in ("eager", "compiled")}
        ours = by_mode.get(AUTO_PICK.get(preset, "eager"))
        eager, compiled = by_mode["eager"], by_mode["compiled"]
    else:
        ours, eager = by_impl.get("ours"), by_impl.get("eager", by_impl.get("unfused"))
        compiled = by_impl.get("compiled")
    if ours is None or (eager is None and compiled is None):
        return None
    return (group, fmt_time(ours), fmt_time(eager), fmt_time(compiled),
            fmt_ratio(ratio(eager, ours)), fmt_ratio(ratio(compiled, ours)))


def summary_table(r: Results) -> list[str]:
    """Ours vs eager PyTorch vs torch.compile, one row per group (time ratios > 1: ours faster)."""
    groups: dict[str, list[dict]] = {}
    for bench in r.benchmarks:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    lines = [f"Device: {r.device}. Median times; a ratio above 1 means ours is faster. Train "
             "steps: ours = what --use_compile auto picks for the preset's default run "
             f"({', '.join(f'{k}: {v}' for k, v in AUTO_PICK.items())}); eager = unfused for "
             "the fused linear cross-entropy.", "",
             "| group | ours | eager | compiled | eager / ours | compiled / ours |",
             "|---|---|---|---|---|---|"]
    for group in sorted(groups):
        row = _summary_row(group, groups[group])
        if row:
            lines.append("| " + " | ".join(row) + " |")
    trainer = r.by_name.get("test_minimind_trainer")
    if trainer:
        extra = trainer.get("extra_info", {})
        lines += ["", f"Trainer, h512 L8 S512 B8 ({extra.get('mode', '?')}): useful tokens/s "
                  f"{fmt_ratio(extra.get('useful_tokens_per_s_ratio'))}x MiniMind's (stand-in), "
                  f"all tokens/s {fmt_ratio(extra.get('tokens_per_s_ratio'))}x; MiniMind's padded "
                  f"rows hold {fmt_ratio(100 * extra.get('padded_useful_fraction', math.nan))}% "
                  "useful tokens on the bundled corpus."]
    return lines


def render(r: Results, brief: bool = False) -> str:
    lines = ["## Where", ""] + header(r)
    lines += ["", "## Targets", "", *targets_table(r), "", "## Ours vs eager vs compiled", "",
              *summary_table(r)]
    if not brief:
        lines += ["", "## Results by group", "",
                  "Rates from the median time; peak mem = extra memory the case allocates "
                  "(CUDA: max_memory_allocated; CPU: allocator events from torch.profiler); "
                  "\"of matmul\" = the step's FLOP rate over a plain matmul's "
                  f"({'bf16' if r.device == 'cuda' else 'fp32'}), timed in alternating blocks."]
        lines += group_tables(r)
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output(s)")
    parser.add_argument("--out", help="write the markdown here (default: stdout)")
    parser.add_argument("--merged", help="also write the merged JSON here")
    parser.add_argument("--brief", action="store_true",
                        help="where, targets and the ours/eager/compiled summary only")
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
    text = render(results, brief=args.brief)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
