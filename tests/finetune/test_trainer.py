"""The trainer: loss goes down, resuming equals not stopping, accumulation equals a big batch."""

import copy
import math
from pathlib import Path

import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.finetune.lora import LoraAdapter
from sparse_merge.finetune.settings import FinetuneSettings
from sparse_merge.finetune.throughput import _status_mb
from sparse_merge.finetune.trainer import Trainer, cosine_with_warmup
from sparse_merge.hardware import Hardware
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.toy import ReversalTask
from sparse_merge.tracking.io import load_checked, save_checked

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _setup(tiny_llama, mode="sparse_to_sparse"):
    masks = MagnitudePruner().prune(tiny_llama, None, 0.5)
    adapter = LoraAdapter(mode=mode, target_modules=TARGETS)
    return adapter, adapter.wrap(copy.deepcopy(tiny_llama), masks)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _trainer(tmp_path=None, **kw):
    settings = FinetuneSettings(**{"log_every": 2, "checkpoint_every": 0, **kw})
    return Trainer(settings, Hardware(), seed=3, checkpoint_dir=tmp_path)


def test_loss_goes_down(tiny_llama, tokenizer):
    # one answer for every prompt; the frozen, small random embeddings of the tiny model cap
    # how far the logits can move, so the loss drops from ~4.1 to ~3.4 and no further
    examples = [Example(f"rev:{a}{b}=", "done") for a in "abcdefgh" for b in "abcdefgh"]
    _, model = _setup(tiny_llama)
    result = _trainer(steps=12, batch_size=16, lr=2e-2, log_every=3).train(
        model, tokenizer, examples
    )
    assert result.steps == 12 and len(result.losses) == 12
    assert sum(result.losses[-3:]) / 3 < 0.9 * result.losses[0]
    assert result.final_loss == pytest.approx(sum(result.losses[-3:]) / 3)
    assert result.samples == 12 * 16 and result.tokens == 12 * 16 * (7 + 5)
    assert result.samples_per_s > 0 and result.peak_memory_mb > 0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux counters")
def test_cpu_peak_memory_is_the_training_loops_own(tiny_llama, tokenizer):
    """On the CPU the peak is the process's resident size while it trains: a larger peak
    earlier in the process (an earlier job of a multirun) does not count."""
    examples = ReversalTask(2, 3, n_select=0, n_heldout=0).train_examples(16, seed=0)
    _, model = _setup(tiny_llama)
    before = _status_mb("VmRSS")
    big = torch.ones(1024 * 2**20 // 4)  # 1 GiB, written, so resident; freed before training
    del big
    result = _trainer(steps=2, batch_size=8).train(model, tokenizer, examples)
    assert 0 < result.peak_memory_mb < before + 512


def test_resumed_run_equals_uninterrupted_run(tiny_llama, tokenizer, tmp_path):
    examples = ReversalTask(2, 3, n_select=0, n_heldout=0).train_examples(50, seed=0)
    kw = dict(steps=6, batch_size=8, checkpoint_every=2, lr=1e-2)
    _, full = _setup(tiny_llama)
    done = _trainer(tmp_path / "a", **kw).train(full, tokenizer, examples)

    _, part = _setup(tiny_llama)
    first = _trainer(tmp_path / "b", **kw).train(part, tokenizer, examples, stop_at=3)
    assert first.steps == 3 and (tmp_path / "b" / "trainer_state.pt").exists()
    _, resumed = _setup(tiny_llama)  # a fresh process: the weights come from the checkpoint
    second = _trainer(tmp_path / "b", **kw).train(resumed, tokenizer, examples, resume=True)
    assert second.resumed_from == 3 and second.steps == 6
    assert second.losses == done.losses
    a, b = _trainable(full), _trainable(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # the counts are the whole run's, not the steps after the resume only
    assert (second.samples, second.tokens) == (done.samples, done.tokens)
    assert second.seconds > first.seconds > 0
    # a finished run resumed again trains nothing and reports what the run measured
    _, again = _setup(tiny_llama)
    third = _trainer(tmp_path / "b", **kw).train(again, tokenizer, examples, resume=True)
    assert (third.steps, third.samples, third.tokens) == (6, done.samples, done.tokens)
    assert third.seconds == pytest.approx(second.seconds, rel=0.2)
    assert third.samples_per_s == pytest.approx(second.samples_per_s, rel=0.2)


@pytest.mark.parametrize("layout", ["per_process", "main_only"])
def test_a_resume_continues_the_dropout_draws(tiny_llama, tokenizer, tmp_path, layout):
    """With LoRA dropout a resumed run ends with the uninterrupted run's weights: the checkpoint
    restores the RNG (``main_only``: a checkpoint of an older version, which held the main
    process's state as ``rng``/``cuda_rng``, resumes the same way)."""
    examples = ReversalTask(2, 3, n_select=0, n_heldout=0).train_examples(50, seed=0)
    kw = dict(steps=4, batch_size=8, checkpoint_every=2, lr=1e-2)
    masks = MagnitudePruner().prune(tiny_llama, None, 0.5)
    adapter = LoraAdapter(mode="sparse_to_dense", target_modules=TARGETS, lora_dropout=0.3)
    runs = {}
    for name, stop_at in (("full", None), ("part", 2), ("part", None)):
        model = adapter.wrap(copy.deepcopy(tiny_llama), masks)
        resume = stop_at is None and name == "part"
        if resume:
            path = tmp_path / name / "trainer_state.pt"
            state = load_checked(path)
            assert "rng" not in state and "cuda_rng" not in state  # stored once, per process
            if layout == "main_only":
                main = state.pop("rng_per_process")[0]
                save_checked(path, {**state, "rng": main["cpu"], "cuda_rng": main["cuda"]})
            torch.manual_seed(12345)  # a fresh process draws from elsewhere until restored
        _trainer(tmp_path / name, **kw).train(
            model, tokenizer, examples, stop_at=stop_at, resume=resume
        )
        runs[name] = _trainable(model)
    full, resumed = runs["full"], runs["part"]
    assert all(torch.equal(full[n], resumed[n]) for n in full)


def test_fp16_loss_scale_is_resumed(tiny_llama, tokenizer, tmp_path):
    """The fp16 loss scale (and its growth tracker) is part of the checkpoint, and the schedule
    does not advance on a step the scaler skipped: a resumed run continues exactly. Accelerate
    builds its GradScaler on CUDA only, so here the trainer's Accelerator is given a CPU one
    (float32 compute; a scale of 2^127 overflows, so the first steps are skipped; no clipping,
    which Accelerate unscales for only under its own fp16 setting)."""
    examples = ReversalTask(2, 3, n_select=0, n_heldout=0).train_examples(80, seed=0)
    kw = dict(steps=8, batch_size=8, checkpoint_every=2, lr=1e-2, max_grad_norm=0)

    def trainer(folder):
        t = _trainer(folder, **kw)
        t.accelerator.native_amp = True
        t.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
        return t

    _, full = _setup(tiny_llama)
    uninterrupted = trainer(tmp_path / "a")
    done = uninterrupted.train(full, tokenizer, examples)
    skipped = 127 - math.log2(uninterrupted.accelerator.scaler.get_scale())
    assert 0 < skipped < 8  # steps were skipped, and steps were taken
    _, part = _setup(tiny_llama)
    trainer(tmp_path / "b").train(part, tokenizer, examples, stop_at=4)
    _, resumed = _setup(tiny_llama)
    second = trainer(tmp_path / "b").train(resumed, tokenizer, examples, resume=True)
    assert second.losses == done.losses
    a, b = _trainable(full), _trainable(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_logged_learning_rate_is_the_one_each_step_used(tiny_llama, tokenizer):
    class Logs:
        def __init__(self):
            self.lr = {}

        def log(self, metrics, step):
            self.lr[step] = metrics["train/lr"]

    examples = ReversalTask(2, 3, n_select=0, n_heldout=0).train_examples(40, seed=0)
    settings = FinetuneSettings(steps=5, batch_size=8, lr=1.0, warmup=0.4, log_every=1)
    logs = Logs()
    _, model = _setup(tiny_llama)
    Trainer(settings, Hardware(), logs, seed=3).train(model, tokenizer, examples)
    factor = cosine_with_warmup(5, 0.4)
    assert logs.lr == {k + 1: pytest.approx(factor(k)) for k in range(5)}  # 0.5, 1, 1, .75, .25


def test_fp16_on_the_cpu_is_refused():
    """Accelerate has no float16 autocast on the CPU; it trained in float32 under that name."""
    with pytest.raises(ConfigError) as err:
        Trainer(FinetuneSettings(mixed_precision="fp16"), Hardware())
    assert err.value.key == "finetune.mixed_precision"


def test_accumulation_equals_one_big_batch(tiny_llama, tokenizer):
    # equal-length answers: the mean of micro-batch means is the batch mean
    examples = [Example(f"rev:{a}{b}=", f"{b}{a}") for a in "abcdefgh" for b in "abcdefgh"]
    _, one = _setup(tiny_llama)
    _trainer(steps=2, batch_size=16, grad_accum=1, warmup=0.0).train(one, tokenizer, examples)
    _, acc = _setup(tiny_llama)
    _trainer(steps=2, batch_size=4, grad_accum=4, warmup=0.0).train(acc, tokenizer, examples)
    a, b = _trainable(one), _trainable(acc)
    assert any(not torch.equal(a[n], _trainable(_setup(tiny_llama)[1])[n]) for n in a)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-3, atol=1e-5)


def test_batches_visit_every_example_once_per_epoch():
    trainer = _trainer(steps=5, batch_size=3, grad_accum=2)
    examples = [Example(str(i), "x") for i in range(12)]
    seen = [
        e.prompt
        for step in range(2)
        for m in range(2)
        for e in trainer.batch_examples(examples, step, m)
    ]
    assert sorted(seen, key=int) == [str(i) for i in range(12)]
    again = [e.prompt for m in range(2) for e in trainer.batch_examples(examples, 2, m)]
    assert len(set(again)) == 6 and again != seen[:6]  # next epoch, new order


def test_schedule_warms_up_then_decays_to_zero():
    f = cosine_with_warmup(10, 0.2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(9) < 0.05 and f(10) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"steps": 0}, "finetune.steps"),
        ({"warmup": 1.0}, "finetune.warmup"),
        ({"mixed_precision": "fp8"}, "finetune.mixed_precision"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError) as err:
        FinetuneSettings(**kwargs)
    assert err.value.key == key


class _Payload:
    """Runs code when unpickled (what a hostile checkpoint file carries)."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_checkpoint_that_carries_code_is_refused_not_run(
    tiny_llama, tokenizer, tmp_path, monkeypatch
):
    import pickle

    monkeypatch.chdir(tmp_path)
    examples = ReversalTask(2, 3, n_select=0, n_heldout=0).train_examples(20, seed=0)
    (tmp_path / "b").mkdir()
    torch.save({"step": 1, "evil": _Payload()}, tmp_path / "b" / "trainer_state.pt")
    _, model = _setup(tiny_llama)
    with pytest.raises(pickle.UnpicklingError):
        _trainer(tmp_path / "b", steps=2, batch_size=4).train(
            model, tokenizer, examples, resume=True
        )
    assert not (tmp_path / "PWNED").exists()


def test_resume_without_a_checkpoint_says_so(tiny_llama, tokenizer, tmp_path, caplog):
    examples = ReversalTask(2, 3, n_select=0, n_heldout=0).train_examples(20, seed=0)
    _, model = _setup(tiny_llama)
    with caplog.at_level("WARNING", logger="sparse_merge"):
        result = _trainer(tmp_path / "none", steps=1, batch_size=4).train(
            model, tokenizer, examples, resume=True
        )
    assert result.resumed_from == 0 and "no checkpoint" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "random bytes inside"])
def test_a_damaged_checkpoint_is_refused_with_one_clear_line(
    tiny_llama, tokenizer, tmp_path, damage
):
    examples = ReversalTask(2, 3, n_select=0, n_heldout=0).train_examples(20, seed=0)
    _, model = _setup(tiny_llama)
    _trainer(tmp_path / "run", steps=2, batch_size=4, checkpoint_every=1).train(
        model, tokenizer, examples
    )
    (path,) = (tmp_path / "run").rglob("trainer_state.pt")
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        start = len(raw) // 3
        raw[start : start + 1024] = bytes(range(256)) * 4
    path.write_bytes(bytes(raw))
    _, model = _setup(tiny_llama)
    with pytest.raises(ValueError, match="is damaged") as info:
        _trainer(tmp_path / "run", steps=4, batch_size=4, checkpoint_every=1).train(
            model, tokenizer, examples, resume=True
        )
    assert "\n" not in str(info.value)
