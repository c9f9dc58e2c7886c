"""Synthetic toy tasks that need different skills: multi-digit addition and string reversal.

Every example is generated from a seed, so the same seed gives the same datapoints. Prompts are
split once and for all by a stable hash: one in ``EVAL_SHARE`` may be evaluated, the rest may be
trained on, so no training set (the toy parents' or a fine-tuning run's) ever contains an
evaluation prompt, whatever the seeds. The held-out split is drawn first from ``data_seed``
(fixed across runs, so reported numbers are comparable), the selection split next from
``(data_seed, selection_seed)``.
"""

from __future__ import annotations

import random
import string
import zlib

from sparse_merge.errors import ConfigError, check_int
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.generation import ExactMatchTask

EVAL_SHARE = 5  # one prompt in 5 is reserved for evaluation


def is_eval_prompt(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the evaluation partition (stable across runs and machines)."""
    return zlib.crc32(prompt.encode()) % EVAL_SHARE == 0


class ToyTask:
    """A seeded synthetic skill with disjoint selection / held-out / training examples."""

    name = "toy"

    def __init__(
        self,
        n_select: int = 128,
        n_heldout: int = 256,
        data_seed: int = 0,
        selection_seed: int = 0,
        batch_size: int = 128,
    ) -> None:
        check_int("n_select", n_select)  # 0: a task used for training only (the toy zoo's)
        check_int("n_heldout", n_heldout)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        rng = random.Random(f"{self.name}:{data_seed}")
        heldout = self._unique(rng, n_heldout, exclude=set(), key="n_heldout")
        rng = random.Random(f"{self.name}:{data_seed}:{selection_seed}")
        selection = self._unique(rng, n_select, exclude={e.prompt for e in heldout}, key="n_select")
        self.heldout = self.make_task(f"{self.name}/heldout", heldout)
        self.selection = self.make_task(f"{self.name}/selection", selection)

    # subclasses define these
    max_new_tokens: int

    def sample(self, rng: random.Random) -> Example:
        """One random example."""
        raise NotImplementedError

    def make_task(self, name: str, examples: list[Example]) -> ExactMatchTask:
        """The scored task over ``examples`` (exact match of the greedy completion)."""
        return ExactMatchTask(name, examples, self.max_new_tokens, self.batch_size)

    def _unique(
        self, rng: random.Random, n: int, exclude: set[str], key: str = "n_select"
    ) -> list[Example]:
        seen, out = set(exclude), []
        if n == 0:
            return out
        for _ in range(200 * n):
            e = self.sample(rng)
            if is_eval_prompt(e.prompt) and e.prompt not in seen:
                seen.add(e.prompt)
                out.append(e)
                if len(out) == n:
                    return out
        raise ConfigError(
            key, n, f"at most {len(out)}: {self.name} has no more distinct evaluation prompts left"
        )

    def describe(self) -> dict[str, object]:
        """The parameters that define the examples (used in cache keys)."""
        return {"task": type(self).__name__, **self._params()}

    def _params(self) -> dict[str, object]:
        raise NotImplementedError

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` training examples (repeats allowed), never an evaluation prompt."""
        rng = random.Random(f"{self.name}:train:{seed}")
        out: list[Example] = []
        for _ in range(100 * n):
            e = self.sample(rng)
            if not is_eval_prompt(e.prompt):
                out.append(e)
                if len(out) == n:
                    return out
        raise ValueError(f"{self.name}: every candidate training example is an evaluation prompt")


class AdditionTask(ToyTask):
    """``a+b=`` -> the decimal sum, with operands of ``min_digits``..``max_digits`` digits."""

    name = "addition"

    def __init__(
        self,
        min_digits: int = 1,
        max_digits: int = 2,
        n_select: int = 128,
        n_heldout: int = 256,
        data_seed: int = 0,
        selection_seed: int = 0,
        batch_size: int = 128,
    ) -> None:
        if not 1 <= min_digits <= max_digits <= 9:
            raise ConfigError(
                "max_digits", max_digits, f"1 <= min_digits({min_digits}) <= max_digits <= 9"
            )
        self.min_digits, self.max_digits = min_digits, max_digits
        self.max_new_tokens = max_digits + 2  # sum digits + stop
        super().__init__(n_select, n_heldout, data_seed, selection_seed, batch_size)

    def _params(self) -> dict[str, object]:
        return {"min_digits": self.min_digits, "max_digits": self.max_digits}

    def sample(self, rng: random.Random) -> Example:
        """One random sum."""
        a, b = (
            rng.randint(0, 10 ** rng.randint(self.min_digits, self.max_digits) - 1) for _ in "ab"
        )
        return Example(f"{a}+{b}=", f"{a + b}")


class ReversalTask(ToyTask):
    """``rev:abc=`` -> ``cba`` for strings of ``min_len``..``max_len`` letters."""

    name = "reversal"

    def __init__(
        self,
        min_len: int = 2,
        max_len: int = 5,
        alphabet: str = string.ascii_lowercase[:10],
        n_select: int = 128,
        n_heldout: int = 256,
        data_seed: int = 0,
        selection_seed: int = 0,
        batch_size: int = 128,
    ) -> None:
        if not 1 <= min_len <= max_len:
            raise ConfigError("max_len", max_len, f"1 <= min_len({min_len}) <= max_len")
        self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet
        self.max_new_tokens = max_len + 1
        super().__init__(n_select, n_heldout, data_seed, selection_seed, batch_size)

    def _params(self) -> dict[str, object]:
        return {"min_len": self.min_len, "max_len": self.max_len, "alphabet": self.alphabet}

    def sample(self, rng: random.Random) -> Example:
        """One random string to reverse."""
        s = "".join(rng.choices(self.alphabet, k=rng.randint(self.min_len, self.max_len)))
        return Example(f"rev:{s}=", s[::-1])
