"""Run under a 2-process launch: sharded selection scores and held-out means vs single-process
ones (rank 0 writes both to the JSON file named by argv[1])."""

import json
import sys
from types import SimpleNamespace

import torch

from sparse_merge.evolution.distributed import ShardedScorer, leave_process_group
from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.models.toy import toy_llama
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.generation import ExactMatchTask
from sparse_merge.tasks.suite import TaskSuite


def varied(pred: str, answer: str) -> bool:
    """A match that depends on the prediction, so a random model gets mixed scores."""
    return sum(map(ord, pred)) % 2 == 0


def suite() -> TaskSuite:
    tasks = {}
    for name, n in (("a", 7), ("b", 5)):  # odd sizes: uneven shards
        ex = [Example(f"{name}{i}+{i * 3}=", str(i)) for i in range(n)]
        sel = ExactMatchTask(f"{name}/selection", ex, 3, batch_size=4, match=varied)
        ex = [Example(f"{name}{i}*{i + 5}=", str(i)) for i in range(n + 4)]
        held = ExactMatchTask(f"{name}/heldout", ex, 3, batch_size=4, match=varied)
        tasks[name] = SimpleNamespace(name=name, selection=sel, heldout=held)
    return TaskSuite(tasks, weights={"a": 1.0, "b": 3.0})


def main() -> None:
    torch.set_num_threads(1)
    tok = char_tokenizer()
    model = toy_llama(tok, seed=0, hidden_size=32, intermediate_size=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large random weights: completions that differ from prompt to prompt
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    tasks = suite()
    scorer = ShardedScorer(tasks)
    sharded = scorer(model, tok)
    heldout = ShardedScorer(tasks, split="heldout").evaluate(model, tok)
    if scorer.is_main:
        single = tasks.score_selection(model, tok)
        out = {"world": scorer.world, "sharded": sharded.tolist(), "single": single.tolist()}
        out.update(heldout_sharded=heldout, heldout_single=tasks.evaluate_heldout(model, tok))
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    leave_process_group()  # as run.py does at exit


if __name__ == "__main__":
    main()
