"""The shared argument checks: what each accepts, what it refuses and what its message says."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_swag.checks import (
    MAX_SEED,
    check_batch_count,
    check_choice,
    check_int,
    check_positive,
    check_scale,
    check_seed,
    parse_dtype,
)


def test_check_int_accepts_ints_at_or_above_the_minimum_and_refuses_bools_and_floats() -> None:
    check_int("rank", 3, 3)
    check_int("rank", None, 1, allow_none=True)
    for bad in (2, True, 3.0, "3", None):
        with pytest.raises(ValueError, match=r"Owner: rank must be an int >= 3, got"):
            check_int("rank", bad, 3, owner="Owner")
    with pytest.raises(ValueError, match=r"or None"):
        check_int("rank", 0, 1, allow_none=True)


def test_check_scale_and_check_positive_return_floats_and_refuse_non_finite_numbers() -> None:
    assert check_scale(0) == 0.0 and isinstance(check_scale(2), float)
    assert check_positive("noise", 1) == 1.0 and isinstance(check_positive("noise", 1), float)
    assert check_positive("noise", None, allow_none=True) is None
    for bad in (-1e-9, math.inf, math.nan, True, "1", None):
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            check_scale(bad)
    for bad in (0, 0.0, -1, math.inf, math.nan, False):
        with pytest.raises(ValueError, match="X: noise must be a finite number > 0, got"):
            check_positive("noise", bad, owner="X")


def test_check_seed_spans_the_signed_64_bit_range_of_torch_generators() -> None:
    assert check_seed(0) == 0 and check_seed(None) is None
    assert check_seed(MAX_SEED) == MAX_SEED
    torch.Generator().manual_seed(MAX_SEED)  # the largest seed is one torch takes
    for bad in (-1, MAX_SEED + 1, True, 1.0):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 1\]"):
            check_seed(bad)
    with pytest.raises(ValueError, match=r"got None"):
        check_seed(None, allow_none=False)


def test_check_choice_compares_types_so_that_bools_are_not_ints() -> None:
    assert check_choice("covariance", "diagonal", ("diagonal", "low_rank")) == "diagonal"
    assert check_choice("flag", True, (True, False)) is True
    assert check_choice("n", 1, (1, 2)) == 1
    for bad, choices in ((True, (1, 2)), (1.0, (1, 2)), ("full", ("diagonal", "low_rank"))):
        with pytest.raises(ValueError, match=r"must be one of"):
            check_choice("option", bad, choices)


def test_check_batch_count_takes_counts_and_fractions() -> None:
    for good in (None, 1, 50, 0.5, 1.0):
        check_batch_count("limit", good)
    for bad in (0, -1, 0.0, 1.5, True, "1"):
        with pytest.raises(ValueError, match=r"limit must be an int >= 1, a float in \(0, 1\] or None"):
            check_batch_count("limit", bad)


def test_parse_dtype_takes_names_or_dtypes_within_the_allowed_names() -> None:
    assert parse_dtype("dtype", "float64") is torch.float64
    assert parse_dtype("dtype", torch.bfloat16) is torch.bfloat16
    assert parse_dtype("dtype", torch.float32, allowed=("float32", "float64")) is torch.float32
    for bad in ("float16", torch.float16, "int64", torch.int64):
        with pytest.raises(ValueError, match=r"must be one of \['float32', 'float64'\]"):
            parse_dtype("dtype", bad, allowed=("float32", "float64"))
