"""Write the M2N2 reference's pre-trained digits pair to ``reference_pair.safetensors``.

The paper's "from pre-trained" panel merges one fixed pair: two MLPs started from
``jax.random.normal(k) * 0.01`` with the keys of ``jax.random.split(PRNGKey(42))`` and trained
for 10 full-batch Adam steps (learning rate 3e-3) on the training images of digits 0-4 and of
digits 5-9. The pair is defined by JAX's random number generator, so this script needs JAX
(``pip install jax==0.4.31 jaxlib==0.4.31 optax``, the versions of the reference environment;
JAX >= 0.5 draws different numbers by default). The project itself does not: the file this
writes is committed next to it, and ``DigitsParents(init="file")`` loads it. The genomes are
stored in the ``in_out`` layout (w1 [64, 256], b1, w2 [256, 10], b2), which is the reference's.

    python experiments/m2n2_digits/reference_pair.py
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

HIDDEN = 256
NUMEL = 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10
OUT = Path(__file__).with_name("reference_pair.safetensors")


def logits(genome: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    cut = np.cumsum([64 * HIDDEN, HIDDEN, HIDDEN * 10])
    w1, b1, w2, b2 = jnp.split(genome, cut)
    return jax.nn.relu(x @ w1.reshape(64, HIDDEN) + b1) @ w2.reshape(HIDDEN, 10) + b2


def loss(genome: jnp.ndarray, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    logp = jax.nn.log_softmax(logits(genome, x))
    return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()


@jax.jit
def pretrain(genome: jnp.ndarray, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    adam = optax.adam(3e-3)
    state = adam.init(genome)
    for _ in range(10):
        updates, state = adam.update(jax.grad(loss)(genome, x, y), state)
        genome = optax.apply_updates(genome, updates)
    return genome


def main() -> None:
    images, labels = load_digits(return_X_y=True)
    n = int(0.8 * len(labels))
    x, y = images[:n], labels[:n]
    low = y < 5
    keys = jax.random.split(jax.random.PRNGKey(42), 2)
    pair = {}
    for name, key, rows in (("digits_0_4", keys[0], low), ("digits_5_9", keys[1], ~low)):
        start = jax.random.normal(key, (NUMEL,)) * 0.01
        pair[name] = np.asarray(pretrain(start, x[rows], y[rows]), dtype=np.float32)
        acc = float((logits(pair[name], x).argmax(1) == y).mean())
        print(f"{name}: training accuracy {acc:.4f}")
    meta = {"source": "M2N2 reference recipe, PRNGKey(42)", "layout": "in_out"}
    save_file(pair, str(OUT), metadata=meta)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
