"""Worker for the data-parallel resume test: ``accelerate launch --multi_gpu --num_processes 2
ddp_resume_worker.py OUT`` trains a tiny pruned Llama with LoRA dropout for 6 steps, once
uninterrupted and once stopped after step 3 and resumed from its checkpoint, and writes each
process's trainable weights of both runs to ``OUT/rank<k>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ddp_worker import TARGETS, examples  # run as a script: its folder is on sys.path

from sparse_merge.finetune.lora import LoraAdapter
from sparse_merge.finetune.settings import FinetuneSettings
from sparse_merge.finetune.trainer import Trainer
from sparse_merge.hardware import Hardware
from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.models.toy import toy_llama
from sparse_merge.pruning.magnitude import MagnitudePruner


def train(checkpoints: Path, stop_at: int | None = None, resume: bool = False):
    """Trainable weights after the run (same model, masks and LoRA init in every process)."""
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    model = toy_llama(tokenizer, seed=0, hidden_size=32, intermediate_size=64)
    masks = MagnitudePruner().prune(model, None, 0.5)
    adapter = LoraAdapter(mode="sparse_to_dense", target_modules=TARGETS, lora_dropout=0.3)
    wrapped = adapter.wrap(model, masks)
    settings = FinetuneSettings(steps=6, batch_size=4, lr=1e-2, warmup=0.0, checkpoint_every=3)
    trainer = Trainer(settings, Hardware(), seed=5, checkpoint_dir=checkpoints)
    if resume:
        trainer.check_resume()
    trainer.train(wrapped, tokenizer, examples(), resume=resume, stop_at=stop_at)
    inner = trainer.unwrap(wrapped)
    weights = {n: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}
    return weights, trainer


if __name__ == "__main__":
    out = Path(sys.argv[1])
    whole, trainer = train(out / "whole")
    train(out / "resumed", stop_at=3)
    resumed, _ = train(out / "resumed", resume=True)
    rank = trainer.accelerator.process_index
    torch.save(
        {"world": trainer.accelerator.num_processes, "whole": whole, "resumed": resumed},
        out / f"rank{rank}.pt",
    )
