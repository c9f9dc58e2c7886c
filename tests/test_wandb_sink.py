"""W&B never blocks or breaks a run, and keeps every record: the sink against a recording
stand-in for ``wandb`` (no network, no W&B files)."""

import sys
import types

import pytest

from sparse_merge.tracking.logger import RunLogger, WandbSink


class _Run:
    def __init__(self, fail_finish=False):
        self.rows, self.metrics, self.fail_finish = [], {}, fail_finish

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, data, step=None, commit=None):
        assert step is None, "W&B's own step counts every record: a step given may go back"
        self.rows.append(dict(data))

    def finish(self):
        if self.fail_finish:
            raise RuntimeError("upload failed")


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.SimpleNamespace(
        init=lambda **kw: calls.append(kw) or module.run,
        Settings=lambda **kw: kw,
        run=_Run(),
    )
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module, calls


def test_records_without_a_step_do_not_push_the_steps_out(tmp_path, fake_wandb, monkeypatch):
    """The evolution logs its initial members and its setup before step 0: all reach W&B, each
    step as the value ``step`` that the charts plot against (with W&B's own step they moved its
    counter to 3, and steps 0-2 were dropped as out of order)."""
    module, _ = fake_wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = RunLogger(WandbSink()).start(tmp_path)
    logger.log({"event": "initial", "mean": 0.5})
    logger.log({"event": "initial", "mean": 0.7})
    logger.log({"event": "setup", "seconds": 1.0})
    for step in range(3):
        logger.log({"child_mean": 0.1 * step}, step=step)
    logger.close()
    rows = module.run.rows
    assert len(rows) == 6 and [r.get("step") for r in rows[3:]] == [0, 1, 2]
    assert module.run.metrics == {"step": None, "*": "step"}


def test_an_unreachable_server_logs_offline_at_once(tmp_path, fake_wandb, monkeypatch):
    """An API key and no network: W&B's own init waited a minute, then the run logged nothing."""
    _, calls = fake_wandb
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: closed
    WandbSink().start(tmp_path, {})
    assert calls[-1]["mode"] == "offline"


def test_a_failing_finish_does_not_fail_the_run(tmp_path, fake_wandb, monkeypatch, caplog):
    module, _ = fake_wandb
    module.run = _Run(fail_finish=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = RunLogger(WandbSink()).start(tmp_path)
    logger.close()  # the run's files are complete; W&B's upload is not the run
    assert "W&B finish failed" in caplog.text
