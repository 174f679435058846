"""Smoke tests of ``benchmarks/subset.py``: its by-hand floors are the posterior's distribution, the
laplace-torch rows are sized honestly, and each table runs once at tiny sizes (no timing asserted)."""

from __future__ import annotations

import pytest
import torch
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("subset") as module:
        yield module


def test_the_hand_drawn_floor_samples_the_posterior(bench) -> None:
    """The by-hand draw of the first-batch floor has the posterior's mean and covariance (checked
    against ``diag(var) + FᵀF`` over 20,000 draws), so the floor does the work of a real draw."""
    torch.manual_seed(0)
    net = bench.HeadNet(3, features=4)
    post = bench.walk_posterior(net, ["head.*"], snapshots=8)
    draws = bench.HandDraw(post)(20_000, torch.Generator().manual_seed(1)).double()
    variance, factor = post.covariance_factors()
    covariance = bench.SCALE * (torch.diag(variance) + factor.T @ factor)
    torch.testing.assert_close(
        draws.mean(0), post.mean, atol=4 * covariance.diag().max().sqrt() / 100, rtol=0
    )
    torch.testing.assert_close(torch.cov(draws.T), covariance, atol=0.05 * covariance.abs().max(), rtol=0)


def test_laplace_rows_run_on_a_batch_one_input_or_not_at_all(bench) -> None:
    """``[B, C, C·(F+1)]`` float32 Jacobians: a batch when they fit, one input when only that fits."""
    gib = bench.jacobian_gib(1000, 1)
    assert gib == pytest.approx(1000 * 1000 * 513 * 4 / 2**30)
    assert bench.laplace_mode("laplace kron", 10, 8.0) == (bench.WIDE_BATCH, None)
    inputs, note = bench.laplace_mode("laplace kron", 1000, 8.0)
    assert inputs == 1 and "122 GiB" in str(note)
    inputs, note = bench.laplace_mode("laplace diag", 3100, 8.0)
    assert inputs is None and "18.4 GiB per input" in str(note)
    assert bench.laplace_mode("SWAG linearised", 3100, 8.0) == (bench.WIDE_BATCH, None)


@pytest.mark.slow
def test_the_tables_run(bench, capsys) -> None:
    for only in ("small", "outputs", "full"):
        bench.main(["--only", only, "--repeats", "1", "--snapshots", "3", "--classes", "10"])
    out = capsys.readouterr().out
    for heading in ("## 1. A small conv net", "## 2. Output spaces", "## 3. Full posterior"):
        assert heading in out
    assert "| 10 | linearised, link_approx='mc' |" in out
    assert "mc vs sampled, largest |Δ mean probability| = 0" in out
