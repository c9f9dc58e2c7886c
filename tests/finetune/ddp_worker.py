"""Worker for the data-parallel test: ``accelerate launch --multi_gpu --num_processes 2 ddp_worker.py OUT``
trains a tiny pruned Llama with sparse-to-sparse LoRA and writes each process's trainable
weights to ``OUT/rank<k>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sparse_merge.finetune.lora import LoraAdapter
from sparse_merge.finetune.settings import FinetuneSettings
from sparse_merge.finetune.trainer import Trainer
from sparse_merge.hardware import Hardware
from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.models.toy import toy_llama
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.tasks.base import Example

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def examples() -> list[Example]:
    """Equal-length answers, so a mean over micro-batch means is the batch mean."""
    return [Example(f"rev:{a}{b}=", f"{b}{a}") for a in "abcdefgh" for b in "abcdefgh"]


def train(batch_size: int) -> tuple[dict[str, torch.Tensor], Trainer]:
    """Trainable weights after 4 steps (same model, masks and LoRA init in every process)."""
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    model = toy_llama(tokenizer, seed=0, hidden_size=32, intermediate_size=64)
    masks = MagnitudePruner().prune(model, None, 0.5)
    wrapped = LoraAdapter(mode="sparse_to_sparse", target_modules=TARGETS).wrap(model, masks)
    settings = FinetuneSettings(
        steps=4, batch_size=batch_size, lr=1e-2, warmup=0.0, checkpoint_every=0
    )
    trainer = Trainer(settings, Hardware(), seed=5)
    trainer.train(wrapped, tokenizer, examples())
    inner = trainer.unwrap(wrapped)
    return {n: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}, trainer


if __name__ == "__main__":
    out = Path(sys.argv[1])
    weights, trainer = train(batch_size=4)
    rank = trainer.accelerator.process_index
    torch.save(
        {"world": trainer.accelerator.num_processes, "weights": weights}, out / f"rank{rank}.pt"
    )
