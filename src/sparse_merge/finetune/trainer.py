"""A small trainer on Accelerate for any model whose trainable parameters need gradients.

Data parallel over however many processes ``accelerate launch`` starts (DDP; gloo on CPU),
gradient accumulation, mixed precision where the hardware allows, a tqdm bar on the main
process, and atomic checkpoints (trainable tensors, optimiser, schedule, RNG, counters) from
which a resumed run continues as if it had not stopped.

Batches are drawn deterministically from the step number: epoch ``e`` visits the examples in
the order of a permutation seeded by ``(seed, e)``, each optimiser step takes the next
``batch_size * grad_accum * world_size`` of them and process ``k`` takes its own slice. So the
data a step sees depends on nothing but the seed and the step, which is what makes resuming
exact. A checkpoint also stores every setting that shapes the result (``run_settings``: the
seed, ``finetune.*`` but for logging and checkpoint intervals, and what the pipeline adds); a
resume with any of them changed is refused with one line naming each (``check_resume``), so a
resumed run is never a hybrid of two configurations. ``finetune.steps`` is one of them: the
cosine schedule and the examples drawn depend on it, so a longer run is a new run.

The loss of a step is the mean of its micro-batches' losses (each a mean over its answer
tokens), an approximation of the token-weighted mean when micro-batches differ in size.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError
from sparse_merge.finetune.data import encode_examples
from sparse_merge.finetune.settings import FinetuneSettings
from sparse_merge.finetune.throughput import PeakRss
from sparse_merge.hardware import Hardware
from sparse_merge.tasks.base import Example
from sparse_merge.tracking.io import check_resume_settings, load_checked, save_checked
from sparse_merge.tracking.logger import RunLogger

log = logging.getLogger("sparse_merge")

CHECKPOINT = "trainer_state.pt"
# finetune.* settings that do not change what training computes: a resume may change them
NOT_SHAPING = ("log_every", "checkpoint_every")


@dataclass
class TrainResult:
    """What a training run measured, all processes summed. A resumed run counts every step
    since the run began: the checkpoint carries the counts, loop seconds and peak memory of the
    steps before it, so its throughput is that of the whole run (a finished run resumed again
    reports what it reported), not of the steps after the resume alone."""

    steps: int
    final_loss: float  # mean loss of the last ``log_every`` steps
    losses: list[float] = field(default_factory=list)  # per optimiser step
    samples: int = 0  # examples seen by all processes
    tokens: int = 0  # non-padding tokens seen by all processes
    seconds: float = 0.0  # wall time of the training loop (of each part of a resumed run)
    peak_memory_mb: float = 0.0  # during the loop: CUDA memory allocated, or RSS on CPU
    resumed_from: int = 0  # step the run resumed from (0: fresh)

    @property
    def samples_per_s(self) -> float:
        """Examples per second over all processes."""
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Non-padding tokens per second over all processes."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat metrics for logs and summaries."""
        return {
            "train/steps": self.steps,
            "train/final_loss": self.final_loss,
            "train/samples_per_s": self.samples_per_s,
            "train/tokens_per_s": self.tokens_per_s,
            "train/seconds": self.seconds,
            "train/peak_memory_mb": self.peak_memory_mb,
            "train/resumed_from": self.resumed_from,
        }


@dataclass
class _Totals:
    """What the training loop has measured so far (see ``TrainResult``)."""

    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


def resolve_precision(setting: str, hardware: Hardware) -> str:
    """Accelerate's ``mixed_precision``: ``auto`` is bf16 on a CUDA device with bf16, else no.
    ``fp16`` on the CPU is refused: Accelerate has no float16 autocast there and would train
    in float32 under that name."""
    if setting == "fp16" and hardware.device == "cpu":
        raise ConfigError(
            "finetune.mixed_precision",
            setting,
            "bf16, no or auto on the CPU (Accelerate has no float16 autocast there: it would "
            "train in float32)",
        )
    if setting != "auto":
        return setting
    if hardware.device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def cosine_with_warmup(steps: int, warmup: float):
    """LR multiplier per step: linear warm-up over ``warmup * steps``, then cosine to 0."""
    n_warm = max(1, round(warmup * steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        progress = (step - n_warm) / max(1, steps - n_warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def peak_memory_mb(device: torch.device, rss: PeakRss) -> float:
    """Peak memory of the training loop (MiB): on CUDA the most allocated on ``device`` since
    its peak was reset, on the CPU this process's peak resident size since ``rss`` started
    (Linux's ``VmHWM``, reset then). Where it could not be reset, the process's lifetime peak
    (``ru_maxrss``), which also counts earlier jobs of a multirun and, through ``exec``, the
    peak of the process that launched this one."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if rss.peak_mb is not None:
        return rss.peak_mb
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    """AdamW on a model's trainable parameters with Accelerate (see the module docstring).

    Args:
        settings: the ``finetune`` settings.
        hardware: device and dtype.
        logger: where training losses go (main process only).
        seed: data order and dropout.
        checkpoint_dir: where checkpoints are written and a resume reads them (None: none).
        run_settings: the other settings that shape the result, by config key (the pipeline's
            sparsity, adapter, pruner, model, tasks): stored in each checkpoint with the
            trainer's own, and a resume must match them all.
    """

    def __init__(
        self,
        settings: FinetuneSettings,
        hardware: Hardware,
        logger: RunLogger | None = None,
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        run_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.hardware = hardware
        self.logger = logger
        self.seed = seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.run_settings: dict[str, Any] = {
            "seed": seed,
            **{f"finetune.{k}": v for k, v in asdict(settings).items() if k not in NOT_SHAPING},
            **(run_settings or {}),
        }
        self._resume_state: dict[str, Any] | None = None  # read by check_resume, not yet used
        # constant buffers (masks, rotary tables) need no broadcast every step
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        self.accelerator = Accelerator(
            cpu=hardware.device == "cpu",
            mixed_precision=resolve_precision(settings.mixed_precision, hardware),
            kwargs_handlers=[ddp],
        )

    @property
    def is_main_process(self) -> bool:
        """Whether this is the process that writes files."""
        return self.accelerator.is_main_process

    def batch_examples(self, examples: Sequence[Example], step: int, micro: int) -> list[Example]:
        """The examples this process trains on at optimiser ``step``, micro-batch ``micro``."""
        acc = self.accelerator
        s = self.settings
        global_batch = s.batch_size * acc.num_processes
        start = ((step * s.grad_accum + micro) * global_batch) + acc.process_index * s.batch_size
        out = []
        n = len(examples)
        for i in range(start, start + s.batch_size):
            epoch, pos = divmod(i, n)
            out.append(examples[int(self._order(epoch, n)[pos])])
        return out

    def _order(self, epoch: int, n: int) -> torch.Tensor:
        cache = getattr(self, "_orders", None)
        if cache is None or cache[0] != (epoch, n):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = ((epoch, n), torch.randperm(n, generator=gen))
        return self._orders[1]

    def examples_needed(self) -> int:
        """Examples all processes consume over the whole run (one pass, no repeats)."""
        return (
            self.settings.steps * self.settings.examples_per_step * self.accelerator.num_processes
        )

    def train(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example],
        resume: bool = False,
        stop_at: int | None = None,
    ) -> TrainResult:
        """Train ``model`` in place (its trainable parameters); ``resume`` continues from the
        checkpoint in ``checkpoint_dir``; ``stop_at`` ends the loop early after that step (as
        an interrupted run would, leaving its checkpoint)."""
        s, acc = self.settings, self.accelerator
        if not examples:
            raise ValueError("no training examples")
        torch.manual_seed(self.seed + acc.process_index)  # dropout; data order has its own
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(s.steps, s.warmup)
        )
        model, optimizer = acc.prepare(model, optimizer)
        start, losses, before = 0, [], _Totals()
        if resume:
            start, losses, before = self._load(model, optimizer, schedule)
        end = s.steps if stop_at is None else min(stop_at, s.steps)

        device = acc.device
        rss = PeakRss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            rss.start()
        model.train()
        samples = tokens = 0
        bar = tqdm(
            range(start, end),
            desc="fine-tune",
            initial=start,
            total=s.steps,
            disable=not acc.is_local_main_process,
            leave=False,
        )
        began = time.perf_counter()
        for step in bar:
            step_loss = 0.0
            for micro in range(s.grad_accum):
                batch = encode_examples(
                    tokenizer, self.batch_examples(examples, step, micro), s.max_length
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                last = micro == s.grad_accum - 1
                with nullcontext() if last else acc.no_sync(model):  # sync on the last only
                    loss = model(**batch).loss / s.grad_accum
                acc.backward(loss)
                step_loss += loss.item()
                samples += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
            if s.max_grad_norm > 0:
                acc.clip_grad_norm_(params, s.max_grad_norm)
            lr = schedule.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            if not acc.optimizer_step_was_skipped:  # fp16: the scaler skips a step on inf/NaN
                schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_mean = float(acc.reduce(torch.tensor(step_loss, device=device), "mean"))
            losses.append(loss_mean)
            bar.set_postfix(loss=f"{loss_mean:.3f}")
            done = step + 1
            if self.logger is not None and acc.is_main_process and done % s.log_every == 0:
                recent = losses[-s.log_every :]
                self.logger.log(
                    {
                        "train/loss": sum(recent) / len(recent),
                        "train/lr": lr,
                    },
                    step=done,
                )
            if s.checkpoint_every and (done % s.checkpoint_every == 0 or done == end):
                totals = self._totals(before, samples, tokens, began, rss, ran=True)
                self._save(model, optimizer, schedule, done, losses, totals)
        if acc.device.type == "cuda":
            torch.cuda.synchronize(acc.device)
        totals = self._totals(before, samples, tokens, began, rss, ran=end > start)
        bar.close()
        model.eval()
        recent = losses[-s.log_every :] or [float("nan")]
        return TrainResult(
            steps=len(losses),
            final_loss=sum(recent) / len(recent),
            losses=losses,
            **asdict(totals),
            resumed_from=start,
        )

    def _totals(
        self, before: _Totals, samples: int, tokens: int, began: float, rss: PeakRss, ran: bool
    ) -> _Totals:
        """``before`` (the steps a resume continues) plus this loop's counts (summed over the
        processes: every process calls this), seconds and peak memory so far; ``ran``: whether
        this loop trained a step (a finished run resumed again adds nothing)."""
        seconds = time.perf_counter() - began
        rss.stop()  # reads the high-water mark so far
        device = self.accelerator.device
        counts = self.accelerator.reduce(torch.tensor([samples, tokens], device=device), "sum")
        peak = peak_memory_mb(device, rss) if ran else 0.0
        return _Totals(
            samples=before.samples + int(counts[0]),
            tokens=before.tokens + int(counts[1]),
            seconds=before.seconds + (seconds if ran else 0.0),
            peak_memory_mb=max(before.peak_memory_mb, peak),
        )

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model without its DDP wrapper."""
        return self.accelerator.unwrap_model(model)

    def _trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        inner = self.unwrap(model)
        return {n: p.detach().cpu() for n, p in inner.named_parameters() if p.requires_grad}

    def _save(
        self, model, optimizer, schedule, step: int, losses: list[float], totals: _Totals
    ) -> None:
        """One checkpoint file written atomically by the main process (all ranks agree on it)."""
        if self.checkpoint_dir is None:
            return
        rngs = self._rng_states()  # a collective: every process takes part
        if self.accelerator.is_main_process:
            scaler = self.accelerator.scaler  # fp16 on CUDA: the loss scale and its tracker
            state = {
                "step": step,
                "losses": losses,
                "totals": asdict(totals),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "trainable": self._trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                # every process's own (dropout differs by process); older checkpoints hold the
                # main process's only, as "rng" and "cuda_rng", and still resume
                "rng_per_process": rngs,
                "world_size": self.accelerator.num_processes,
                "run": self.run_settings,
            }
            save_checked(self.checkpoint_dir / CHECKPOINT, state)
        self.accelerator.wait_for_everyone()

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every process's RNG states (``cpu``, ``cuda``), by rank; every process must call it
        (under a launch it gathers them)."""
        mine = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        if self.accelerator.num_processes == 1:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])

    def check_resume(self) -> None:
        """Read the checkpoint a resume continues, if there is one, and refuse it (one line) when
        this run's settings or process count differ from those it was written with. Called
        before the model loads, it refuses early; ``train(resume=True)`` then restores the
        state read here without reading the file again."""
        if self._resume_state is not None:
            return
        path = None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT
        if path is None or not path.exists():
            log.warning(
                "resume requested but no checkpoint in %s: starting fresh", self.checkpoint_dir
            )
            self._resume_state = {}
            return
        state = load_checked(path)
        if "run" in state:
            check_resume_settings(state["run"], self.run_settings, path.parent)
        else:
            log.warning(
                "the checkpoint in %s stores no settings (an older version wrote it): resuming "
                "without checking that this run's settings are the ones it was made with",
                path.parent,
            )
        if state["world_size"] != self.accelerator.num_processes:
            # a ConfigError, like the changed settings above: one line, and the app puts back
            # the run folder's identity and status (a finished run stays finished)
            raise ConfigError(
                "resume",
                True,
                f"the process count the checkpoint in {path.parent} was made with: "
                f"{state['world_size']} processes (now {self.accelerator.num_processes}; each "
                "process's slice of every batch depends on it); launch as many, or start a new "
                "run in another folder",
            )
        self._resume_state = state

    def _load(self, model, optimizer, schedule) -> tuple[int, list[float], _Totals]:
        """Restore the last checkpoint, if any; returns (step, losses so far, what the steps so
        far measured)."""
        self.check_resume()
        state, self._resume_state = self._resume_state, None
        if not state:
            return 0, [], _Totals()
        params = {n: p for n, p in self.unwrap(model).named_parameters() if p.requires_grad}
        saved = state["trainable"]
        wrong = sorted(params.keys() ^ saved.keys()) or [
            n for n in saved if saved[n].shape != params[n].shape
        ]
        if wrong:
            n = wrong[0]
            shapes = [tuple(t[n].shape) if n in t else "absent" for t in (saved, params)]
            raise ValueError(
                f"{self.checkpoint_dir / CHECKPOINT} does not fit this model's trainable tensors "
                f"({n}: {shapes[0]} in the checkpoint, {shapes[1]} now); resume with the "
                "settings it was made with, or start a new run in another folder"
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler = self.accelerator.scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rank = self.accelerator.process_index
        per_process = state.get("rng_per_process")
        if per_process is not None:  # every process continues its own draws
            rng = per_process[rank]
        elif rank == 0:  # an older checkpoint holds the main process's only
            rng = {"cpu": state["rng"], "cuda": state["cuda_rng"]}
        else:
            rng = None
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        # an older checkpoint has no totals: the result then counts the steps after it only
        totals = _Totals(**state.get("totals", {}))
        return int(state["step"]), list(state["losses"]), totals
