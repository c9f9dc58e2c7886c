"""The shared value checks: every refusal names the key, the value and what is allowed."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from sparse_merge.errors import ConfigError, check_finite, check_positive, is_number
from sparse_merge.evolution.one_shot import OneShotMerge
from sparse_merge.evolution.scoring import SparsityAwareScorer


@pytest.mark.parametrize("value", [0, -3, 2.5, np.float32(0.25), Fraction(1, 3), 1e308])
def test_finite_real_numbers_pass(value):
    assert is_number(value) and is_number(value, finite=True)
    assert check_finite("k", value) == float(value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, np.float64("inf")])
def test_infinities_are_numbers_but_not_finite(value):
    assert is_number(value) and not is_number(value, finite=True)
    with pytest.raises(ConfigError, match="a finite number"):
        check_finite("k", value)


@pytest.mark.parametrize("value", [math.nan, True, False, "1", None, [1.0], 1j])
def test_nan_bools_and_non_numbers_are_refused(value):
    assert not is_number(value) and not is_number(value, finite=True)
    with pytest.raises(ConfigError) as err:
        check_finite("lambda_", value)
    assert err.value.key == "lambda_" and str(err.value).startswith("lambda_=")


def test_check_positive_refuses_inf_only_when_asked():
    assert check_positive("step", math.inf) == math.inf
    with pytest.raises(ConfigError, match="a finite number > 0"):
        check_positive("step", math.inf, finite=True)


@pytest.mark.parametrize("weights", [[1.0, math.inf], [math.nan, 1.0], [True, 1.0], "11"])
def test_one_shot_refuses_weights_that_are_not_finite_numbers(weights):
    with pytest.raises(ConfigError) as err:
        OneShotMerge(weights=weights)
    assert err.value.key == "weights"


@pytest.mark.parametrize("epsilon", [-1e-9, math.nan, math.inf, True, "0"])
def test_the_zero_threshold_is_a_finite_number_at_least_zero(epsilon):
    with pytest.raises(ConfigError) as err:
        SparsityAwareScorer(epsilon=epsilon)
    assert err.value.key == "epsilon" and "only exact zeros count" in err.value.allowed
