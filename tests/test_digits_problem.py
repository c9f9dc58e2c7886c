import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.evolution.digits import DigitsProblem
from sparse_merge.models.digits import DigitsParents
from sparse_merge.tasks.digits import DigitsTask


@pytest.fixture(scope="module")
def task():
    return DigitsTask()


@pytest.fixture(scope="module")
def problem(task):
    return DigitsProblem(DigitsParents("scratch"), task, seed=3)


def test_is_a_problem_with_the_digits_shapes(problem):
    assert problem.numel == 64 * 256 + 256 + 256 * 10 + 10
    assert problem.n_datapoints == 1437 and problem.workspace.shape == (problem.numel,)
    odd, even = problem.descriptor_masks
    assert int(odd.sum() + even.sum()) == 1437 and not (odd & even).any()


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_flat_evaluation_matches_the_module(layout, task):
    problem = DigitsProblem(DigitsParents("scratch", layout=layout), task, seed=3)
    genome = torch.randn(problem.numel, generator=torch.Generator().manual_seed(0))
    model = problem.space.load(genome)
    expected = (model(task.selection.images).argmax(-1) == task.selection.labels).float()
    assert torch.equal(problem.evaluate(genome), expected)
    test_acc = (model(task.heldout.images).argmax(-1) == task.heldout.labels).float().mean()
    assert problem.heldout(genome) == {
        "digits": pytest.approx(float(test_acc)),
        "mean": pytest.approx(float(test_acc)),
    }
    assert 0.0 < float(expected.mean()) < 0.5  # a random MLP is right on some images only


def test_batched_evaluation_equals_one_by_one(problem):
    genomes = torch.randn(5, problem.numel, generator=torch.Generator().manual_seed(1))
    batch = problem.evaluate_batch(genomes)
    assert batch.shape == (5, 1437)
    for i in range(5):
        assert torch.equal(batch[i], problem.evaluate(genomes[i]))


def test_initial_parents_are_seeded(task):
    a = DigitsProblem(DigitsParents("scratch"), task, seed=3).initial()
    b = DigitsProblem(DigitsParents("scratch"), task, seed=3).initial()
    c = DigitsProblem(DigitsParents("scratch"), task, seed=4).initial()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(next(iter(a.values())), next(iter(c.values())))


def test_prune_is_exact_per_weight_matrix_and_spares_biases(problem):
    genome = torch.randn(problem.numel, generator=torch.Generator().manual_seed(2))
    assert problem.sparsity(genome) == 0.0
    problem.prune_(genome, 0.25)
    w1 = problem.space.view(genome, "w1")
    w2 = problem.space.view(genome, "w2")
    assert int((w1 == 0).sum()) == w1.numel() // 4 and int((w2 == 0).sum()) == w2.numel() // 4
    assert int((problem.space.view(genome, "b1") == 0).sum()) == 0
    assert problem.sparsity(genome) == 0.25
    with pytest.raises(ConfigError, match="sparsity"):
        problem.prune_(genome, 1.5)


def test_raw_pixels_keep_sklearn_values():
    raw, scaled = DigitsTask(raw_pixels=True), DigitsTask()
    assert raw.selection.images.max() == 16.0
    assert torch.allclose(raw.selection.images / 16.0, scaled.selection.images)


def test_reference_layout_puts_one_pixels_fan_out_first(task):
    problem = DigitsProblem(DigitsParents("scratch"), task, seed=3)
    genome = torch.zeros(problem.numel)
    genome[:256] = 1.0  # in_out: the first 256 entries are pixel 0's weights to every unit
    w1 = problem.space.view(genome, "w1")
    assert w1.shape == (64, 256) and bool((w1[0] == 1).all()) and float(w1[1:].abs().sum()) == 0


def test_parents_from_a_file(task, tmp_path):
    from safetensors.torch import save_file

    numel = DigitsProblem(DigitsParents("scratch"), task).numel
    pair = {"digits_0_4": torch.randn(numel), "digits_5_9": torch.randn(numel)}
    save_file(pair, str(tmp_path / "pair.safetensors"))
    parents = DigitsParents("file", path=str(tmp_path / "pair.safetensors"))
    for seed in (0, 1):  # the same pair whatever the seed
        initial = DigitsProblem(parents, task, seed=seed).initial()
        assert all(torch.equal(initial[k], pair[k]) for k in pair)
    with pytest.raises(ConfigError, match="path"):
        DigitsParents("file", path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="hidden=32"):  # genomes of another size
        DigitsParents("file", hidden=32, path=str(tmp_path / "pair.safetensors"))


def test_the_committed_reference_pair_loads():
    from pathlib import Path

    path = (
        Path(__file__).resolve().parents[1] / "experiments/m2n2_digits/reference_pair.safetensors"
    )
    task = DigitsTask(raw_pixels=True)
    problem = DigitsProblem(DigitsParents("file", path=str(path)), task)
    accs = {k: float(problem.evaluate(g).mean()) for k, g in problem.initial().items()}
    assert accs == {
        "digits_0_4": pytest.approx(0.4934, abs=1e-4),
        "digits_5_9": pytest.approx(0.4816, abs=1e-4),
    }
    # read in the other layout, the same numbers were the weights transposed: 13.8 % / 5.5 %
    with pytest.raises(ConfigError, match="holds its genomes in") as err:
        DigitsParents("file", path=str(path), layout="out_in")
    assert err.value.key == "layout"
