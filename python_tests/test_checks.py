"""oqfl_ext._checks.check_int: the one integer-argument check, and the callers that use it."""

import numpy as np
import pytest
import torch

from oqfl_ext import models
from oqfl_ext._checks import check_int
from oqfl_ext.data import load_digits
from oqfl_ext.nn import LSQQuantizer


@pytest.mark.parametrize("value", [0, 7, -3, 2**70, np.int64(5), np.uint8(200), torch.tensor(4)])
def test_integers_come_back_as_python_ints(value):
    got = check_int("n", value)
    assert type(got) is int and got == int(value)


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None, [1], torch.tensor(1.0),
                                   np.float64(2.0)])
def test_non_integers_are_refused_with_the_name(value):
    with pytest.raises(ValueError, match=r"^count expected an integer, got "):
        check_int("count", value)


@pytest.mark.parametrize("kwargs, ok, bad, words", [
    (dict(minimum=1), 1, 0, "a positive integer"),
    (dict(minimum=0), 0, -1, "a non-negative integer"),
    (dict(minimum=3), 3, 2, "an integer >= 3"),
    (dict(maximum=9), -5, 10, "an integer <= 9"),
    (dict(minimum=2, maximum=4), 4, 5, r"an integer in \[2, 4\]"),
])
def test_bounds_are_inclusive_and_named(kwargs, ok, bad, words):
    assert check_int("k", ok, **kwargs) == ok
    with pytest.raises(ValueError, match=rf"^k expected {words}, got {bad}$"):
        check_int("k", bad, **kwargs)


def test_none_only_when_allowed():
    assert check_int("limit", None, minimum=1, allow_none=True) is None
    with pytest.raises(ValueError, match=r"limit expected None or a positive integer, got 0"):
        check_int("limit", 0, minimum=1, allow_none=True)
    with pytest.raises(ValueError, match=r"limit expected a positive integer, got None"):
        check_int("limit", None, minimum=1)


def test_long_values_are_cut_in_the_message():
    with pytest.raises(ValueError) as e:
        check_int("client_id", "x" * 10_000)
    assert len(str(e.value)) < 200


def test_callers_use_it():
    # one wording everywhere: constructor arguments, data loaders, quantizer options
    with pytest.raises(ValueError, match=r"width expected a positive integer, got True"):
        models.SmallCNN(width=True)
    with pytest.raises(ValueError, match=r"blocks_per_stage expected a positive integer, got 0"):
        models.ResNet20(blocks_per_stage=0)
    with pytest.raises(ValueError, match=r"limit expected None or a positive integer, got 2.0"):
        load_digits("train", limit=2.0)
    with pytest.raises(ValueError, match=r"num_channels \(with per_channel_axis\) expected a "
                                         r"positive integer, got 0"):
        LSQQuantizer(4, False, per_channel_axis=0, num_channels=0)
    # numpy integers are accepted where Python ints are
    def shapes(m):
        return [tuple(p.shape) for p in m.parameters()]
    assert shapes(models.SmallCNN(width=np.int64(8))) == shapes(models.SmallCNN(width=8))
