"""Embedded toy parents: a tiny Llama base model and two children fine-tuned from it, one per
toy skill (as math and coder models share a base), trained in-process and offline, cached on
disk under a key derived from their whole configuration."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError, check_positive
from sparse_merge.finetune.data import encode_examples
from sparse_merge.hardware import pinned_threads
from sparse_merge.models.hf import (
    check_attention_arch,
    load_causal_lm,
    load_tokenizer,
    save_causal_lm,
)
from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.tasks.toy import ToyTask

CACHE_VERSION = 2  # bump when training code changes what a cached model would be
# What a zoo trains under, whatever the calling process set (``hardware.num_threads``, the
# machine's core count). Unpinned, the bits depended on the intra-op thread count: MKL's matmuls
# split the 56-token vocabulary of the LM head across threads and sum the pieces differently
# (8 threads gave other models than 1), and ATen's full reductions over more than 32768
# elements split their input even at 2 threads. One thread reproduces the existing caches
# (conf/model/toy, toy_easy and the smoke zoo, where the README's tables come from) bit for
# bit; so do 2, 3, 4 and 6 on an AVX-512 machine, 5, 7, 8 and 16 do not. Interop threads are
# left alone: eager training does no inter-op work, and torch can set their number only before
# the first parallel work. Not pinned, and still machine-dependent: the CPU's vector width
# (ATen's AVX2 kernels give other bits than AVX-512 ones, on one thread too) and torch's version.
DETERMINISM: dict[str, Any] = {"num_threads": 1, "deterministic_algorithms": True}
# The pinning that the caches made before it are, bit for bit: the cache key includes
# ``DETERMINISM`` only where it differs from this, so those caches stay valid while any other
# pinning trains under a key of its own.
UNPINNED_EQUIVALENT: dict[str, Any] = {"num_threads": 1, "deterministic_algorithms": True}
# LlamaConfig fields of a toy model that ``arch`` (``model.arch``) does not set
TOY_ARCH: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def toy_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **arch: Any) -> LlamaForCausalLM:
    """A tiny random Llama for ``tokenizer`` (``arch`` overrides ``LlamaConfig`` fields)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TOY_ARCH, **arch},
    )
    torch.manual_seed(seed)  # HF initialises from the global RNG; seed it for reproducible models
    return LlamaForCausalLM(config).eval()


@contextmanager
def pinned_training(num_threads: int, deterministic_algorithms: bool = True) -> Iterator[None]:
    """Train on ``num_threads`` intra-op threads (with torch's deterministic algorithms, warning
    only where an op has none) whatever the caller set; the caller's settings come back after."""
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with pinned_threads(num_threads):
        torch.use_deterministic_algorithms(deterministic_algorithms, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)


def train_lm(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    skills: list[ToyTask],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    weights: list[float] | None = None,
) -> list[float]:
    """AdamW on a mixture of ``skills``' training examples (loss on answers), uniform unless
    ``weights`` (one per skill, summing to 1) says otherwise; returns losses."""
    rng = random.Random(seed)
    total = steps * batch_size
    counts = (
        [int(total * w) + 1 if w > 0 else 0 for w in weights]
        if weights
        else [total // len(skills) + 1] * len(skills)
    )
    examples = [e for task, n in zip(skills, counts) if n for e in task.train_examples(n, seed)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # 10 % warm-up, but at least 2 steps: OneCycleLR divides by (warm-up steps - 1), so a run
    # of 1 or 2 steps schedules 3 (it stops before the end of the cycle)
    total_steps = max(steps, 3)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps, pct_start=max(0.1, 2.0 / total_steps)
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False)
    for _ in bar:
        batch = encode_examples(tokenizer, rng.sample(examples, batch_size))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


class ToyZoo:
    """A base model trained on easy instances of every skill, and one child per skill
    fine-tuned from it on that skill's hard instances. Trained once, then loaded from the cache.

    ``child_replay`` is the share of each child's training examples drawn from the base skills
    (rehearsal, spread evenly over them): a child then keeps what the base knew instead of
    drifting everywhere, so its task vector changes little besides its own skill.
    ``child_batch_size`` (default ``batch_size``) is the children's batch size.
    """

    def __init__(
        self,
        name: str,
        cache_dir: str,
        base_skills: Mapping[str, ToyTask],
        children: Mapping[str, ToyTask],
        arch: Mapping[str, Any] | None = None,
        base_steps: int = 1500,
        child_steps: int = 500,
        batch_size: int = 64,
        lr: float = 3e-3,
        child_lr: float = 1e-3,
        seed: int = 0,
        child_replay: float = 0.0,
        child_batch_size: int | None = None,
    ) -> None:
        if len(children) < 2:
            raise ConfigError("children", list(children), "two or more child skills")
        check_positive("base_steps", base_steps)
        check_positive("child_steps", child_steps)
        check_positive("batch_size", batch_size)
        child_batch_size = batch_size if child_batch_size is None else child_batch_size
        check_positive("child_batch_size", child_batch_size)
        if not 0.0 <= child_replay < 1.0:
            raise ConfigError("child_replay", child_replay, "a share in [0, 1)")
        self.name = name
        self.base_skills = dict(base_skills)
        self.children = dict(children)
        self.arch = dict(arch or {})
        check_attention_arch({**TOY_ARCH, **self.arch}, "arch")  # not a transformers traceback
        self.steps = (base_steps, child_steps)
        self.batch_size, self.lrs, self.seed = batch_size, (lr, child_lr), seed
        self.child_replay = float(child_replay)
        self.child_batch_size = int(child_batch_size)
        spec = {
            "version": CACHE_VERSION,
            "arch": self.arch,
            "base": {k: t.describe() for k, t in self.base_skills.items()},
            "children": {k: t.describe() for k, t in self.children.items()},
            "steps": self.steps,
            "batch_size": batch_size,
            "lrs": self.lrs,
            "seed": seed,
            "child_replay": self.child_replay,
            "child_batch_size": self.child_batch_size,
        }
        keyed = spec if DETERMINISM == UNPINNED_EQUIVALENT else {**spec, "pinned": DETERMINISM}
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
        self.root = Path(cache_dir).expanduser() / f"{name}-{key}"
        # spec.json records the pinning either way, and (not keyed) what else decides the bits
        self._spec = {
            **spec,
            "pinned": DETERMINISM,
            "trained_with": {
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            },
        }

    def arch_config(self) -> LlamaConfig:
        """The zoo's architecture (the vocabulary aside) without building or training a model:
        what config checks inspect on the ``meta`` device."""
        return LlamaConfig(**{**TOY_ARCH, **self.arch})

    def _path(self, member: str) -> Path:
        return self.root / member

    def _ready(self) -> bool:
        return all((self._path(m) / "config.json").exists() for m in ["base", *self.children])

    def ensure(self) -> Path:
        """Train and cache the base and the children unless the cache already has them.

        A file lock makes concurrent processes (``accelerate launch``, parallel sweep jobs) wait
        for one of them to train instead of training the same models twice.
        """
        if self._ready():
            return self.root
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".lock")):
            if not self._ready():
                self._train()
        return self.root

    def _train(self) -> None:
        with pinned_training(**DETERMINISM):
            self._train_pinned()

    def _train_pinned(self) -> None:
        tokenizer = char_tokenizer()
        base_path = self._path("base")
        if not (base_path / "config.json").exists():
            model = toy_llama(tokenizer, seed=self.seed, **self.arch)
            train_lm(
                model,
                tokenizer,
                list(self.base_skills.values()),
                self.steps[0],
                self.lrs[0],
                self.batch_size,
                self.seed,
                desc=f"{self.name}: base",
            )
            save_causal_lm(model, base_path, tokenizer)
        for i, (child, task) in enumerate(self.children.items()):
            if (self._path(child) / "config.json").exists():
                continue
            model = load_causal_lm(base_path)
            replay = list(self.base_skills.values()) if self.child_replay > 0 else []
            train_lm(
                model,
                tokenizer,
                [task, *replay],
                self.steps[1],
                self.lrs[1],
                self.child_batch_size,
                self.seed + 1 + i,
                desc=f"{self.name}: {child}",
                weights=[1.0 - self.child_replay, *[self.child_replay / len(replay)] * len(replay)]
                if replay
                else None,
            )
            save_causal_lm(model, self._path(child), tokenizer)
        (self.root / "spec.json").write_text(json.dumps(self._spec, indent=2, sort_keys=True))

    def base(self) -> Path:
        """The trained base model's directory."""
        return self.ensure() / "base"

    def parents(self) -> dict[str, Path]:
        """The fine-tuned children's directories, by skill name."""
        root = self.ensure()
        return {child: root / child for child in self.children}

    def tokenizer(self) -> Path:
        """Where the character tokenizer is saved (with the base)."""
        return self.base()

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The character tokenizer."""
        return load_tokenizer(self.tokenizer())
