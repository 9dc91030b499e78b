"""The two training recipes: `--recipe default` (this project's) and `--recipe minimind`
(MiniMind's trainer/train_pretrain.py): their flags, optimizers, LR schedules, rows and data
order, and resume. MiniMind's facts used here:
- optimizer: `optim.AdamW(model.parameters(), lr=args.learning_rate)`, torch's defaults
  (betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every parameter);
- LR: `get_lr(epoch * iters + step, epochs * iters, lr)` = lr * (0.1 + 0.45 * (1 + cos(pi s / S)))
  set at every micro-batch (`step` 1-based in the epoch, iters = micro-batches per epoch), the
  optimizer stepping at `step % accumulation_steps == 0` and once more at an epoch's end;
- data: `setup_seed(42 + epoch); torch.randperm(len(train_ds))`, PretrainDataset rows.
"""

import json
import math

import pytest
import torch
from pretrain_helpers import assets, final_state, read_metrics, run, tiny_flags  # noqa: F401

from minimind_fast.config import get_preset
from minimind_fast.data import ResumableSampler, epoch_order
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.train import cli, data_setup, optim, prepare
from minimind_fast.train.distributed import DistContext
from minimind_fast.train.schedule import learning_rate_at, step_learning_rate
from minimind_fast.train.state import TrainState

LR = 5e-4


def resolve(argv):
    """The flags of a fresh run on CPU after preset and recipe defaults."""
    args, explicit = cli.parse_args([str(a) for a in argv])
    return prepare.resolve_flags(args, explicit, None, None, torch.device("cpu"))[0]


def tiny_model():
    torch.manual_seed(0)
    config = get_preset("demo", hidden_size=32, num_hidden_layers=2, vocab_size=97)
    return MiniMindForCausalLM(config)


def minimind_lr(s, total):
    return LR * (0.1 + 0.45 * (1 + math.cos(math.pi * s / total)))


# ---- flags ---------------------------------------------------------------------------------


def recipe_flags(args):
    return (
        args.adam_betas,
        args.weight_decay,
        args.weight_decay_on,
        args.warmup_ratio,
        args.val_fraction,
        args.packing,
        args.add_special_tokens,
    )


def test_each_recipe_fills_its_defaults():
    default = resolve([])
    assert default.recipe == "default"
    assert recipe_flags(default) == ((0.9, 0.95), 0.1, "matrices", 0.02, 0.01, 1, "auto")
    minimind = resolve(["--recipe", "minimind", "--learning_rate", LR])
    assert recipe_flags(minimind) == ((0.9, 0.999), 0.01, "all", 0.0, 0.0, 0, "always")
    assert minimind.min_lr == LR / 10


def test_flags_given_win_over_the_recipe():
    args = resolve(
        [
            "--recipe",
            "minimind",
            "--packing",
            "1",
            "--val_fraction",
            "0.1",
            "--adam_betas",
            "0.8,0.9",
            "--weight_decay",
            "0",
            "--weight_decay_on",
            "matrices",
            "--add_special_tokens",
            "auto",
        ]
    )
    assert recipe_flags(args) == ((0.8, 0.9), 0.0, "matrices", 0.0, 0.1, 1, "auto")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--adam_betas", "0.9"], "--adam_betas: '0.9' must be two numbers in [0, 1)"),
        (["--adam_betas", "0.9,1.0"], "'0.9,1.0' must be two numbers"),
        (["--adam_betas", "a,b"], "'a,b' must be two numbers"),
        (["--weight_decay_on", "norms"], "--weight_decay_on: invalid choice: 'norms'"),
        (["--recipe", "nanogpt"], "--recipe: invalid choice: 'nanogpt'"),
        (
            ["--recipe", "minimind", "--warmup_steps", "10"],
            "--warmup_steps 10: --recipe minimind uses MiniMind's",
        ),
        (
            ["--recipe", "minimind", "--warmup_ratio", "0.1"],
            "--warmup_ratio 0.1: --recipe minimind",
        ),
        (
            ["--recipe", "minimind", "--min_lr", "1e-5"],
            "--min_lr 1e-05: --recipe minimind decays to learning_rate / 10",
        ),
    ],
)
def test_bad_recipe_flags_exit_2_with_one_line(capsys, argv, fragment):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err


def test_help_documents_the_recipe_flags(capsys):
    assert run(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in (
        "--recipe {default,minimind}",
        "--adam_betas B1,B2",
        "--weight_decay_on {all,matrices}",
        "default: 0.9,0.95, recipe minimind: 0.9,0.999",
        "default: matrices, recipe minimind: all",
    ):
        assert fragment in text, fragment


# ---- optimizers ----------------------------------------------------------------------------


def build(model, argv):
    args = resolve(argv)
    return optim.build_optimizer(
        model, LR, args.weight_decay, args.adam_betas, args.weight_decay_on
    )


def test_default_recipe_decays_matrices_only():
    model = tiny_model()
    decay, no_decay = build(model, []).param_groups
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding  # tied: one tensor, undecayed
    for name, parameter in model.named_parameters():
        group = decay if parameter.dim() == 2 and parameter is not embedding else no_decay
        assert any(p is parameter for p in group["params"]), name
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    for group in (decay, no_decay):
        assert (group["betas"], group["eps"], group["lr"]) == ((0.9, 0.95), 1e-8, LR)


def test_minimind_recipe_is_minimind_s_adamw():
    model, reference_model = tiny_model(), tiny_model()
    optimizer = build(model, ["--recipe", "minimind"])
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.01)
    reference = torch.optim.AdamW(reference_model.parameters(), lr=LR)  # MiniMind's line
    ids = torch.randint(0, 97, (2, 9))
    for _ in range(3):
        for m, opt in ((model, optimizer), (reference_model, reference)):
            m(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, ours), theirs in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)


def test_a_loaded_optimizer_keeps_this_runs_betas_and_weight_decay():
    """On resume the moments come from the checkpoint, the hyperparameters from the flags."""
    model = tiny_model()
    saved = optim.build_optimizer(model, LR, 0.1, (0.9, 0.95))
    ids = torch.randint(0, 97, (2, 9))
    model(ids, labels=ids).loss.backward()
    saved.step()
    resumed = optim.build_optimizer(model, LR, 0.05, (0.8, 0.99))
    resumed.load_state_dict(saved.state_dict())
    hyper = [(g["betas"], g["weight_decay"]) for g in resumed.param_groups]
    assert hyper == [((0.8, 0.99), 0.05), ((0.8, 0.99), 0.0)]
    first = model.model.embed_tokens.weight
    assert torch.equal(resumed.state[first]["exp_avg"], saved.state[first]["exp_avg"])


# ---- LR schedules --------------------------------------------------------------------------


def schedule_of(argv, num_samples):
    """The LR of every optimizer step, walking the windows as the trainer's loop does."""
    args = resolve(argv)
    state = TrainState(run_id="x", num_samples=num_samples)
    prepare.schedule(state, args, world_size=1, resumed=False)
    batch, accumulation = args.batch_size, args.accumulation_steps
    iters, rates = math.ceil(num_samples / batch), []
    while state.step < state.total_steps:
        for first in range(0, iters, accumulation):
            window = min(accumulation, iters - first)
            rates.append(step_learning_rate(args, state, window, 1))
            for micro in range(first, first + window):
                state.start_step(min(batch, num_samples - micro * batch))
            state.finish_step(first + window == iters)
    return args, state, rates


@pytest.mark.parametrize(
    "num_samples, batch, accumulation, micro_steps",
    [
        (10, 2, 1, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),  # iters 5: MiniMind's LR at every micro-step
        (
            10,
            2,
            2,
            [2, 4, 5, 7, 9, 10],
        ),  # windows [1,2] [3,4] [5]: the value of the last micro-step
        (11, 2, 4, [4, 6, 10, 12]),  # iters 6 (the last micro-batch holds one row): [1-4] [5-6]
    ],
)
def test_minimind_schedule_is_get_lr_at_minimind_s_step_index(
    num_samples, batch, accumulation, micro_steps
):
    argv = [
        "--recipe",
        "minimind",
        "--learning_rate",
        LR,
        "--epochs",
        2,
        "--batch_size",
        batch,
        "--accumulation_steps",
        accumulation,
    ]
    _, state, rates = schedule_of(argv, num_samples)
    total = 2 * math.ceil(num_samples / batch)  # S = epochs * iters
    assert state.warmup_steps == 0
    assert rates == [minimind_lr(s, total) for s in micro_steps]


def test_default_schedule_is_warmup_then_cosine_at_the_optimizer_step():
    argv = [
        "--learning_rate",
        LR,
        "--epochs",
        2,
        "--batch_size",
        2,
        "--accumulation_steps",
        2,
        "--warmup_steps",
        2,
    ]
    args, state, rates = schedule_of(argv, 10)
    assert state.total_steps == 6 and args.min_lr == LR / 10
    cosine = [
        LR / 10 + (LR - LR / 10) * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4))
        for step in range(2, 6)
    ]
    assert rates == pytest.approx([LR / 2, LR] + cosine, rel=1e-12)
    assert rates == [learning_rate_at(step, 6, LR, LR / 10, 2) for step in range(6)]


def test_a_minimind_run_logs_minimind_s_learning_rates(assets, tmp_path):
    run_dir = tmp_path / "run"
    argv = tiny_flags(
        assets,
        run_dir,
        recipe="minimind",
        warmup_steps=None,
        learning_rate=LR,
        epochs=2,
        batch_size=4,
        accumulation_steps=3,
    )
    assert run(argv) == 0
    rows = final_state(run_dir)["train_state"]["num_samples"]
    assert rows == 40  # every document is a row: padded rows, no held-out split
    iters = math.ceil(rows / 4)  # 10 micro-batches: windows end at 3, 6, 9 and 10
    expected = [
        minimind_lr(epoch * iters + end, 2 * iters) for epoch in (0, 1) for end in (3, 6, 9, 10)
    ]
    assert [r["lr"] for r in read_metrics(run_dir) if "loss" in r] == expected


# ---- data ----------------------------------------------------------------------------------


@pytest.fixture
def marked_corpus(tmp_path):
    """Texts MiniMind's tokenizer call reads with special ids inside, one longer than a row."""
    texts = [f"the model reads token {i} and writes the next one" for i in range(9)]
    texts[2] = "a scraped page that spells <|endoftext|> and <|im_end|> in its text"
    texts[5] = " ".join(["gradients point downhill"] * 30)
    path = tmp_path / "marked.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


def training_data(assets, data_path, *flags):
    args = resolve(
        [
            "--preset",
            "demo",
            "--vocab_size",
            320,
            "--data_path",
            data_path,
            "--tokenizer_path",
            assets["tokenizer"],
            "--max_seq_len",
            24,
            "--batch_size",
            4,
            *flags,
        ]
    )
    return args, data_setup.build_data(args, get_preset("demo", vocab_size=320), DistContext())


def test_minimind_recipe_reads_minimind_s_rows_in_minimind_s_order(assets, marked_corpus):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(assets["tokenizer"]))
    path, texts = marked_corpus
    args, data = training_data(assets, path, "--recipe", "minimind")
    T = args.max_seq_len
    for epoch in (0, 1):
        with torch.random.fork_rng():
            torch.manual_seed(42 + epoch)  # MiniMind's setup_seed(42 + epoch)
            order = torch.randperm(len(texts)).tolist()
        data.sampler.set_epoch(epoch)
        assert list(data.sampler) == order
        batch = next(iter(data.loader))
        for row, index in enumerate(order[: args.batch_size]):  # PretrainDataset.__getitem__
            tokens = hf(
                texts[index], add_special_tokens=False, max_length=T - 2, truncation=True
            ).input_ids
            tokens = [hf.bos_token_id] + tokens + [hf.eos_token_id]
            input_ids = torch.tensor(tokens + [hf.pad_token_id] * (T - len(tokens)))
            labels = torch.where(input_ids == hf.pad_token_id, -100, input_ids)
            assert torch.equal(batch["input_ids"][row], input_ids), index
            assert torch.equal(batch["labels"][row], labels), index
    assert data.val_loader is None


def test_sum_seeding_is_seed_plus_epoch():
    with torch.random.fork_rng():
        torch.manual_seed(7 + 3)
        expected = torch.randperm(50)
    assert torch.equal(epoch_order(50, 7, 3, seeding="sum"), expected)
    assert torch.equal(epoch_order(50, 8, 2, seeding="sum"), expected)  # MiniMind's seeds collide
    assert not torch.equal(epoch_order(50, 8, 2), epoch_order(50, 7, 3))  # the default mixes them
    with pytest.raises(ValueError, match="seeding='xor'"):
        ResumableSampler(5, 0, 0, seeding="xor")


@pytest.mark.parametrize("mode, starts_with_bos", [("always", True), ("never", False)])
def test_add_special_tokens_reaches_the_token_cache(assets, marked_corpus, mode, starts_with_bos):
    flags = ("--packing", "0", "--add_special_tokens", mode)
    rows = training_data(assets, marked_corpus[0], *flags)[1].loader.dataset
    assert all((rows[i]["input_ids"][0].item() == 1) == starts_with_bos for i in range(len(rows)))


# ---- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("recipe", "minimind"), ("weight_decay_on", "all")])
def test_resume_refuses_another_recipe_or_decay_groups(assets, tmp_path, capsys, flag, value):
    run_dir = tmp_path / "run"
    assert run(tiny_flags(assets, run_dir, max_steps=2, warmup_steps=None)) == 0
    capsys.readouterr()
    argv = tiny_flags(
        assets, run_dir, max_steps=4, warmup_steps=None, from_resume=1, **{flag: value}
    )
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert f"--{flag} {value}" in err and "drop the flag" in err
    assert len(err.strip().splitlines()) == 1


def test_a_resumed_minimind_run_refuses_schedule_flags(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(tiny_flags(assets, run_dir, recipe="minimind", warmup_steps=None, max_steps=2)) == 0
    capsys.readouterr()
    argv = tiny_flags(assets, run_dir, warmup_steps=None, max_steps=4, from_resume=1, min_lr=1e-5)
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "--min_lr 1e-05: --recipe minimind decays" in err
    assert len(err.strip().splitlines()) == 1
