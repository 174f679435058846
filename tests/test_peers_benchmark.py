"""Smoke tests of ``benchmarks/peers.py`` that need none of the peer packages.

The correctness table is only worth something if its reference is the paper's formula and its
comparison catches the departures it reports, so both are checked here against independent
computations; the speed harness is run once at tiny sizes (no timing is asserted).
"""

from __future__ import annotations

import math

import pytest
import torch
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def peers():
    with benchmark_script("peers") as module:
        yield module


def test_reference_is_the_papers_formula(peers):
    """Mean, population variance and the last-k deviations from running means, written out by hand."""
    gen = torch.Generator().manual_seed(0)
    snaps = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    ref = peers.reference_posterior(snaps, max_rank=3)

    n, p = snaps.shape
    mean = [sum(float(snaps[i, j]) for i in range(n)) / n for j in range(p)]
    var = [sum((float(snaps[i, j]) - mean[j]) ** 2 for i in range(n)) / n for j in range(p)]
    devs = []
    for i in range(n):
        running = [sum(float(snaps[m, j]) for m in range(i + 1)) / (i + 1) for j in range(p)]
        devs.append([float(snaps[i, j]) - running[j] for j in range(p)])
    last = torch.tensor(devs[-3:], dtype=torch.float64)

    assert ref.rank == 3
    torch.testing.assert_close(ref.mean, torch.tensor(mean, dtype=torch.float64))
    torch.testing.assert_close(ref.variance, torch.tensor(var, dtype=torch.float64))
    torch.testing.assert_close(ref.deviations, last)
    expected = 0.5 * (torch.diag(torch.tensor(var, dtype=torch.float64)) + last.T @ last / 2)
    torch.testing.assert_close(ref.covariance(0.5), expected)


def test_lightning_swag_matches_the_formula(peers):
    rows = peers.run_correctness([peers.OURS], num_samples=20_000, seed=0)
    assert [r["case"] for r in rows] == [c.name for c in peers.CORRECTNESS_CASES]
    for row in rows:
        for key in ("mean", "variance", "dtd", "low_rank"):
            assert row[key] < 1e-6, (row["case"], key, row[key])
        # 20k samples of 75 weights: Monte-Carlo error of the covariance only.
        assert row["sample_cov"] < 0.05, row
        assert row["sample_cov_cross"] < 0.06, row
        assert row["at_floor"] == 0.0


def test_comparison_catches_the_reported_departures(peers):
    """A fake package with a K−1 normaliser and per-tensor noise gets the errors these cause."""
    torch.manual_seed(0)
    template = peers.TinyMLP()
    ids = peers.tensor_ids(template)
    snaps = peers.make_snapshots(template, 8, seed=3)
    ref = peers.reference_posterior(snaps, max_rank=20)
    k, big_k = ref.rank, 20

    # (1) The low-rank term over K − 1 while only k = 8 rows are filled.
    wrong_norm = ref.dtd / (big_k - 1)
    stats = peers.PackageStats(ref.mean, ref.variance, ref.deviations, wrong_norm, snaps)
    err = peers.compare_to_reference(stats, ref, ids)
    assert err["dtd"] == pytest.approx(0.0, abs=1e-12)
    assert err["low_rank"] == pytest.approx(1 - (k - 1) / (big_k - 1), rel=1e-9)

    # (2) Independent low-rank noise per parameter tensor: samples lose every cross-tensor term.
    gen = torch.Generator().manual_seed(1)
    n = 40_000
    scale_root = math.sqrt(0.5)
    factor = ref.deviations / math.sqrt(k - 1)
    samples = ref.mean + scale_root * ref.variance.sqrt() * torch.randn(
        n, ids.numel(), generator=gen, dtype=torch.float64
    )
    for tensor in ids.unique():
        cols = ids == tensor
        z = torch.randn(n, k, generator=gen, dtype=torch.float64)
        samples[:, cols] += scale_root * z @ factor[:, cols]
    stats = peers.PackageStats(ref.mean, ref.variance, ref.deviations, ref.low_rank, samples)
    err = peers.compare_to_reference(stats, ref, ids)
    assert err["sample_cov_cross"] > 0.9
    assert err["low_rank"] == pytest.approx(0.0, abs=1e-12)


def test_harness_runs_and_marks_missing_peers(peers, capsys):
    report = peers.main(
        [
            "--quick",
            "--packages",
            f"{peers.OURS},{peers.PLAIN}",
            "--cases",
            "mlp",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--warmup",
            "0",
            "--corr-samples",
            "2000",
        ]
    )
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    assert {r["package"] for r in report["correctness"]} == {peers.OURS}
    speed = report["speed"]
    assert [r["mode"] for r in speed] == ["one", "predict"]
    assert all(len(r["times"][package]) == 1 for r in speed for package in (peers.OURS, peers.PLAIN))
    # A package without measurements prints "–", and so do the ratios without a peer or plain loop.
    result = peers.SpeedResult("case", "one", 1, {peers.OURS: [1.0]})
    table = peers.format_speed([result], {})
    assert table.splitlines()[-1].count(peers.DASH) == len(peers.PEERS) + 3
    # The plain-loop ratio is its time over ours.
    result = peers.SpeedResult("case", "one", 1, {peers.OURS: [2.0], peers.PLAIN: [3.0]})
    assert peers.format_speed([result], {}).splitlines()[-1].endswith("| 1.50× |")
