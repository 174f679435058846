"""Smoke tests of ``benchmarks/lora.py``: its hand-written floors compute the BMA's numbers on the BMA's
own weight samples, the posterior takes ``K + 3`` copies of the adapter weights, and the tables run
once at tiny sizes (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_script import benchmark_script

TINY = ["--layers", "2", "--hidden", "32", "--seq", "8", "--batch", "4", "--lora-r", "2"]
TINY += ["--rank", "3", "--snapshots", "5", "--samples", "2,3", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("lora") as module:
        yield module


@pytest.fixture(scope="module")
def args(bench):
    return bench.parse_args(TINY)


@pytest.mark.parametrize("last_block_only", [False, True], ids=["all-adapters", "last-block"])
def test_the_hand_loops_give_the_bma_on_its_own_samples(bench, args, last_block_only) -> None:
    model = bench.lora_bert(args, last_block_only=last_block_only)
    post = bench.walk_posterior(model, args.rank, args.snapshots, torch.float64)
    names = list(post.param_shapes)
    assert names and all("lora_" in n or "modules_to_save." in n for n in names)
    assert any("modules_to_save." in n for n in names) != last_block_only
    if last_block_only:
        assert all(f"encoder.layer.{args.layers - 1}." in n for n in names)
    x = bench.batch(args)
    with torch.no_grad():
        bma = bench.bma_for(model, post, 3)
        ours = bma(x)["mean"]
        drawn = bench.samples_of(bma)
        assert len(drawn) == 3 and set(drawn[0]) == set(names)
        assert not torch.equal(drawn[0][names[0]], drawn[1][names[0]])
        trained = {n: p.detach().clone() for n, p in model.named_parameters()}
        loops = [bench.loop_functional(model, x, drawn), bench.loop_copy(model, x, drawn)]
        if last_block_only:
            loops.append(bench.PrefixSuffix(model, args.layers)(x, drawn))
        for hand in loops:
            torch.testing.assert_close(hand, ours, rtol=0, atol=1e-6)
        # the copy loop put the trained weights back; other samples give other probabilities
        assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
        other = bench.hand_draw(post, 3, seed=1)
        assert (bench.loop_functional(model, x, other) - ours).abs().max() > 1e-4


def test_the_hand_draw_has_the_posterior_mean_and_variance(bench, args) -> None:
    model = bench.lora_bert(args)
    post = bench.walk_posterior(model, args.rank, args.snapshots, torch.float64)
    draws = torch.stack(
        [torch.cat([w.reshape(-1) for w in s.values()]) for s in bench.hand_draw(post, 4000, 0)]
    )
    variance, factor = post.covariance_factors()
    expected = bench.SCALE * (variance + factor.square().sum(0))
    spread = expected.sqrt().max().item()
    torch.testing.assert_close(draws.double().mean(0), post.mean, rtol=0, atol=0.1 * spread)
    torch.testing.assert_close(draws.double().var(0), expected, rtol=0.2, atol=1e-12)


def test_the_posterior_takes_k_plus_3_copies_of_the_adapter_weights(bench, args) -> None:
    rows = bench.memory(args)
    f32, f64 = rows["float32 moments"], rows["float64 moments (default)"]
    assert f32["multiple"] == pytest.approx(args.rank + 3, abs=1e-6)
    assert f64["multiple"] == pytest.approx(args.rank + 6, abs=1e-6)  # float64 moments: twice as wide
    assert f32["after_bma_multiple"] == pytest.approx(args.rank + 3, abs=1e-6)
    assert f64["after_bma_multiple"] == pytest.approx(args.rank + 8, abs=1e-6)  # + the float32 sampling cache


@pytest.mark.slow
def test_the_tables_run(bench, capsys, tmp_path) -> None:
    path = tmp_path / "lora.json"
    bench.main([*TINY, "--json", str(path)])
    out = capsys.readouterr().out
    for heading in ("## 1. BMA over adapter samples", "## 2. LoRA in the last block only", "## 3. Memory"):
        assert heading in out
    assert "largest |Δ probability|" in out and "## Goals" in out
    results = json.loads(path.read_text())
    for s in ("2", "3"):
        assert results["all_adapters"][s]["error"] < 1e-6
        assert max(results["last_block"][s]["errors"].values()) < 1e-6
        # the split's outcome is reported: the submodule it runs, or why it refused the model
        assert results["last_block"][s]["split"] or results["last_block"][s]["split_refused"]
    assert results["memory"]["float32 moments"]["multiple"] == pytest.approx(3 + 3, abs=1e-6)
