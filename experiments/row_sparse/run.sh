#!/usr/bin/env bash
# The row-sparse comparison of docs/row_sparse.md: toy base model, toy tasks (2-digit addition,
# reversal of 4-6 characters), 300 steps of batch 32 at lr 1e-2, seeds 0-2, one CPU thread,
# from the base trained on the easy instances only (the toy zoo's earlier default).
# Then: python experiments/row_sparse/summarize.py multirun/row_sparse
set -euo pipefail
B="model.base_skills.addition.max_digits=1 model.base_skills.reversal.max_len=3 model.child_steps=800"
C="experiment=finetune hardware.num_threads=1 save_models=false $B"
sw() { name=$1; shift; rm -rf "multirun/row_sparse/$name"; python run.py -m $C "$@" hydra.sweep.dir=multirun/row_sparse/$name; }
S="seed=0,1,2 finetune.lr=1e-2"
sw A  sparsity=0.0 lora=dense,row_sparse $S                                   # equal parameters (r=8)
sw B  sparsity=0.0 lora=row_sparse lora.importance=random,magnitude,wanda,gradient $S
sw Bz sparsity=0.0 lora=row_sparse lora.importance=zo_taylor lora.n_estimate=64 $S
sw E  sparsity=0.0 lora=row_sparse lora.lora_rank=2 lora.importance=taylor,random $S
sw Ed sparsity=0.0 lora=dense lora.r=2 $S                                      # equal parameters (r=2)
sw C  sparsity=0.0 lora=row_sparse lora.quantize=nf4 lora.init=zeros,residual $S
sw Dm sparsity=0.5 lora=masked lora.mode=sparse_to_sparse $S                   # pruned base
sw Dr sparsity=0.5 lora=row_sparse $S
sw G  sparsity=0.0 lora=row_sparse lora.lora_rank=2 seed=0,1,2 finetune.lr=3e-2
