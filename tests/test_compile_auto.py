"""--use_compile auto: the decision rule, the calibration record, the inductor cache directory,
the warm-up's choices (with timings injected, never measured), fullgraph compiles of dense and
MoE models, the flag, and what a training run logs and saves."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from pretrain_helpers import assets, final_state, read_metrics, run, tiny_flags  # noqa: F401

from minimind_fast.config import MiniMindConfig
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.train import cli
from minimind_fast.train import compile as autocompile
from minimind_fast.train.distributed import DistContext

MEASURED = autocompile.Estimate(compile_s=10.0, speedup=1.25, measured=True)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=64)


# ---- the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", [0, 1])
def test_explicit_settings_are_kept_whatever_the_numbers(setting):
    decision = autocompile.decide(setting, steps_left=10**6, eager_step_s=100.0, estimate=MEASURED)
    assert decision.compile is bool(setting) and decision.reason == f"--use_compile {setting}"


@pytest.mark.parametrize("steps, expected", [(199, False), (201, True)])
def test_auto_compiles_exactly_when_the_saving_repays_the_compile(steps, expected):
    # saving = steps x 0.25 s x (1 - 1/1.25) = steps x 0.05 s against 10 s of compiling
    decision = autocompile.decide("auto", steps, 0.25, MEASURED)
    assert decision.compile is expected
    assert f"{steps} steps left" in decision.reason and "measured here" in decision.reason


def test_auto_counts_every_static_shape_as_a_compile():
    assert autocompile.decide("auto", 300, 0.25, MEASURED, compiles=1).compile
    decision = autocompile.decide("auto", 300, 0.25, MEASURED, compiles=2)  # 15 s < 20 s
    assert not decision.compile and "x 2 shapes" in decision.reason


@pytest.mark.parametrize("speedup", [1.0, 0.8])
def test_auto_never_compiles_what_was_measured_no_faster(speedup):
    estimate = autocompile.Estimate(compile_s=0.001, speedup=speedup, measured=True)
    assert not autocompile.decide("auto", 10**9, 10.0, estimate).compile


def test_without_a_record_the_first_guess_is_used_and_said():
    decision = autocompile.decide("auto", 1, 1.0, autocompile.FIRST_GUESS)
    assert not decision.compile and "first guess" in decision.reason


@pytest.mark.parametrize("rows, batch, micro_left, shapes", [
    (64, 8, 1000, 1),   # the rows divide: one shape
    (65, 8, 1000, 2),   # a short ninth micro-batch ends the epoch
    (65, 8, 8, 1),      # ... that this run never reaches
    (65, 8, 9, 2),
])
def test_shapes_in_run(rows, batch, micro_left, shapes):
    assert autocompile.shapes_in_run(rows, batch, micro_left) == shapes


# ---- the record and the inductor cache --------------------------------------------------------


def _batch(rows=2, seq_len=8):
    ids = torch.randint(0, 64, (rows, seq_len))
    return {"input_ids": ids, "labels": ids.clone()}


def test_record_round_trip_and_key(tmp_path):
    def signature(config=MiniMindConfig(**TINY), batch=None, dtype=torch.float32, world_size=1):
        return autocompile.signature(config, batch or _batch(), dtype, torch.device("cpu"),
                                     world_size, False)

    key = signature()
    others = [signature(batch=_batch(rows=4)), signature(dtype=torch.bfloat16),
              signature(world_size=2),
              signature(config=MiniMindConfig(**dict(TINY, num_hidden_layers=3)))]
    assert signature() == key and key not in others and len(set(others)) == len(others)
    path = tmp_path / "records.json"
    assert autocompile.estimate_for(autocompile.load_records(path), key) == autocompile.FIRST_GUESS
    autocompile.save_record(path, key, 12.5, 1.3)
    assert autocompile.estimate_for(autocompile.load_records(path), key) == \
        autocompile.Estimate(12.5, 1.3, measured=True)
    assert json.loads(path.read_text())[key]["cold"] is True
    autocompile.save_record(path, key, 3.0, 1.3)  # the second compile of the same key
    assert json.loads(path.read_text())[key]["cold"] is False


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"k": {"compile_s": "x"}}', '{"k": 3}'])
def test_unreadable_records_fall_back_to_the_first_guess(tmp_path, content):
    path = tmp_path / "records.json"
    path.write_text(content)
    assert autocompile.estimate_for(autocompile.load_records(path), "k") == autocompile.FIRST_GUESS


def test_inductor_cache_goes_to_the_cache_dir_unless_the_user_chose_one(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMIND_FAST_CACHE", str(tmp_path / "cache"))
    ours = str(tmp_path / "cache" / "inductor")
    monkeypatch.delenv(autocompile.INDUCTOR_CACHE_ENV, raising=False)
    assert autocompile.use_inductor_cache() == ours == os.environ[autocompile.INDUCTOR_CACHE_ENV]
    # importing torch._dynamo writes torch's default into the environment: not a user's choice
    monkeypatch.setenv(autocompile.INDUCTOR_CACHE_ENV, autocompile._torch_default_inductor_dir())
    assert autocompile.use_inductor_cache() == ours
    monkeypatch.setenv(autocompile.INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    assert autocompile.use_inductor_cache() == str(tmp_path / "mine")


# ---- calibration and warm-up ------------------------------------------------------------------


class _Loader:
    """What `prepare` reads from a DataLoader: its dataset, collate_fn and batch_size."""

    def __init__(self, rows=4, seq_len=8):
        ids = torch.randint(0, 64, (rows, seq_len))
        self.dataset = [{"input_ids": row, "labels": row.clone()} for row in ids]
        self.batch_size = 2

    @staticmethod
    def collate_fn(samples):
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def test_first_batch_has_the_loaders_shapes_and_keys():
    batch = autocompile.first_batch(_Loader(rows=5), 2)
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (2, 8)
    assert autocompile.first_batch(_Loader(rows=1), 2)["input_ids"].shape == (1, 8)


def test_warm_up_calls_leave_rng_and_gradients_alone():
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, dropout=0.1)).train()
    loader = _Loader()
    batch = loader.collate_fn(loader.dataset)
    state = torch.get_rng_state()
    autocompile._forward_backward(model, batch, torch.autocast("cpu", enabled=False),
                                  torch.device("cpu"))()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


def _patch(monkeypatch, tmp_path, timings):
    """aot_eager instead of inductor, and injected timings of the warm-up's calls (compile +
    call, compiled call, eager call)."""
    monkeypatch.setenv("MINIMIND_FAST_CACHE", str(tmp_path))
    real = autocompile.compile_model
    monkeypatch.setattr(autocompile, "compile_model",
                        lambda model, ddp: real(model, ddp, backend="aot_eager"))
    clock = iter(timings)
    monkeypatch.setattr(autocompile, "_timed", lambda fn, device: (fn(), next(clock))[1])


class _Run:
    """What Compiler.after_step reads from pretrain's Run."""

    def __init__(self, setting, total_steps, rows=4):
        self.model = MiniMindForCausalLM(MiniMindConfig(**TINY))
        self.ddp, self.context = None, DistContext()
        self.autocast = torch.autocast("cpu", enabled=False)
        self.args = SimpleNamespace(use_compile=setting, batch_size=2, accumulation_steps=1)
        self.state = SimpleNamespace(total_steps=total_steps, step=0)
        self.data = SimpleNamespace(sampler=range(rows), loader=_Loader())
        self.compiler = autocompile.Compiler(setting)
        self.train_model = self.compiler.start(self.model, None, self.data.loader, self.autocast,
                                               self.context, torch.float32, False)
        self.logged = []

    def log(self, message):
        self.logged.append(message)

    def steps(self, seconds):
        for step_s in seconds:
            self.state.step += 1
            self.compiler.after_step(self, step_s)


def test_auto_decides_after_the_second_step_and_compiles_when_it_pays(monkeypatch, tmp_path):
    _patch(monkeypatch, tmp_path, [7.5, 0.5, 1.0])  # compile + call, compiled call, eager call
    run_ = _Run("auto", total_steps=10**6)
    assert run_.train_model is run_.model and run_.args.use_compile == "auto"
    run_.steps([5.0])
    assert run_.compiler.report is None and run_.train_model is run_.model  # not yet
    run_.steps([1.0])
    report = run_.compiler.report
    assert report.compiled and run_.train_model is not run_.model and run_.args.use_compile == 1
    assert report.compile_s == 7.0 and report.eager_s == 1.0 and report.compiled_s == 0.5
    assert run_.logged == [report.line()] and "(auto: 999998 steps left x 1 s" in report.line()
    assert "compiled in 7.0 s" in report.line() and "(2.00x)" in report.line()
    (entry,) = json.loads((tmp_path / autocompile.RECORDS_FILE).read_text()).values()
    assert entry["compile_s"] == 7.0 and entry["speedup"] == 2.0 and entry["cold"]
    run_.steps([1.0])  # decided once
    assert len(run_.logged) == 1


def test_auto_short_run_stays_eager_without_compiling(monkeypatch, tmp_path):
    _patch(monkeypatch, tmp_path, [])
    monkeypatch.setattr(autocompile, "compile_model", lambda *a: pytest.fail("compiled"))
    run_ = _Run("auto", total_steps=5)
    run_.steps([0.01, 0.01])
    assert run_.train_model is run_.model and run_.args.use_compile == 0
    assert run_.logged[0].startswith("compile: off (auto: 3 steps left x 0.01 s")


@pytest.mark.parametrize("total_steps, two_shapes", [(10, True), (3, True), (2, False)])
def test_auto_counts_the_short_last_batch_only_if_the_run_reaches_it(monkeypatch, tmp_path,
                                                                      total_steps, two_shapes):
    _patch(monkeypatch, tmp_path, [])
    monkeypatch.setattr(autocompile, "compile_model", lambda *a: pytest.fail("compiled"))
    run_ = _Run("auto", total_steps=total_steps, rows=5)  # batches of 2, 2, 1 per epoch
    run_.steps([0.01, 0.01])
    assert ("s x 2 shapes to compile" in run_.logged[0]) is two_shapes


def test_auto_drops_a_compiled_call_that_is_not_faster(monkeypatch, tmp_path):
    _patch(monkeypatch, tmp_path, [7.5, 1.2, 1.0])
    run_ = _Run("auto", total_steps=10**6)
    run_.steps([1.0, 1.0])
    assert run_.train_model is run_.model and run_.args.use_compile == 0
    assert "no faster than eager" in run_.logged[0]
    (entry,) = json.loads((tmp_path / autocompile.RECORDS_FILE).read_text()).values()
    assert entry["speedup"] < 1  # so the next run of this model does not try


def test_auto_reads_the_record_of_an_earlier_compile(monkeypatch, tmp_path):
    _patch(monkeypatch, tmp_path, [])
    monkeypatch.setattr(autocompile, "compile_model", lambda *a: pytest.fail("compiled"))
    run_ = _Run("auto", total_steps=1000)
    # measured here: 998 steps x 1 s x (1 - 1/1.01) = 10 s saved, less than 30 s to compile,
    # where the first guess (60 s, 1.2x: 166 s saved) would have compiled
    autocompile.save_record(autocompile.records_path(), run_.compiler.key, 30.0, 1.01)
    run_.steps([1.0, 1.0])
    assert not run_.compiler.report.compiled and "measured here" in run_.logged[0]


def test_forced_compile_happens_before_the_first_step_and_stays(monkeypatch, tmp_path):
    _patch(monkeypatch, tmp_path, [7.5, 1.2, 1.0])  # slower, but asked for
    run_ = _Run(1, total_steps=10)
    assert run_.train_model is not run_.model and run_.compiler.report.compiled
    assert run_.compiler.report.decision.reason == "--use_compile 1"
    run_.steps([1.0, 1.0])
    assert run_.args.use_compile == 1 and run_.logged == []


def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch, tmp_path):
    def broken(fn, device):
        raise RuntimeError("no C++ compiler\nmore detail")

    _patch(monkeypatch, tmp_path, [])
    monkeypatch.setattr(autocompile, "_timed", broken)
    run_ = _Run("auto", total_steps=10**6)
    run_.steps([1.0, 1.0])
    assert run_.train_model is run_.model and run_.args.use_compile == 0
    assert "compiling failed (RuntimeError: no C++ compiler): eager" in run_.logged[0]
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _Run(1, total_steps=10)


@pytest.mark.parametrize("use_moe", [False, True])
def test_compiled_model_is_one_graph_dense_and_moe(use_moe):
    """fullgraph=True raises on any graph break; the MoE layer runs grouped under compile."""
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=use_moe))
    ids = torch.randint(0, 64, (2, 8))
    eager = model(ids, labels=ids)
    compiled = autocompile.compile_model(model, None, backend="aot_eager")(ids, labels=ids)
    torch.testing.assert_close(compiled.loss, eager.loss)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss)


# ---- the flag and the trainer -------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    ([], "auto"), (["--use_compile", "auto"], "auto"), (["--use_compile", "0"], 0),
    (["--use_compile", "1"], 1), (["--use_compile"], 1)])
def test_use_compile_flag(argv, expected):
    args, _ = cli.parse_args(argv)
    assert args.use_compile == expected


def test_use_compile_flag_refuses_other_values(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--use_compile", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "'2' must be 0, 1 or auto" in err[0]


def test_a_short_run_decides_eager_logs_why_and_keeps_the_choice(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(tiny_flags(assets, run_dir, max_steps=3)) == 0
    out = capsys.readouterr().out
    assert "compile: off (auto: 1 steps left x " in out
    assert "first step " in out and " s after start" in out
    first = read_metrics(run_dir)[0]
    assert first["step"] == 1 and first["time_to_first_step_s"] > 0
    assert final_state(run_dir)["args"]["use_compile"] == 0  # resolved: a resume keeps it


@pytest.mark.slow
def test_ddp_compiles_on_every_rank_and_matches_eager(assets, tmp_path):
    """torchrun, 2 gloo ranks: --use_compile 1 warms up under no_sync and trains to the eager
    run's losses (inductor compiles the tiny model on each rank)."""
    from test_ddp import torchrun

    losses = {}
    for setting in (0, 1):
        run_dir = tmp_path / f"compile{setting}"
        result = torchrun(tiny_flags(assets, run_dir, max_steps=3, batch_size=2,
                                     use_compile=setting), timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"compile: {'on' if setting else 'off'} (--use_compile {setting})" in result.stdout
        losses[setting] = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses[1]) == 3
    assert max(abs(a - b) for a, b in zip(losses[0], losses[1])) < 1e-4, losses
