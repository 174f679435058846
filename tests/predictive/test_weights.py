"""The weight stream: the same samples whatever the chunking, the SWA mean at scale 0, and the cache."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from lightning_swag.posterior import SWAGPosterior
from lightning_swag.predictive.weights import SamplingSpec, WeightStream


def _spec(num_samples: int, scale: float, chunk_size: int | None) -> SamplingSpec:
    """A full-covariance spec (the covariance field is being redesigned: only the public fields are named)."""
    fields = {f.name for f in dataclasses.fields(SamplingSpec)}
    extra = {"diagonal_only": False} if "diagonal_only" in fields else {}
    return SamplingSpec(num_samples=num_samples, scale=scale, chunk_size=chunk_size, **extra)


def _walk(net: nn.Module, seed: int, snapshots: int = 5) -> tuple[SWAGPosterior, dict[str, torch.Tensor]]:
    """A posterior of a seeded random walk from ``net`` and the SWA mean of its snapshots, computed here."""
    post = SWAGPosterior.from_model(net, max_rank=3)
    walker, g = copy.deepcopy(net), torch.Generator().manual_seed(seed)
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in net.named_parameters()}
    for _ in range(snapshots):
        with torch.no_grad():
            for name, p in walker.named_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
                sums[name] += p.double()
        post.collect(walker)
    return post, {n: s / snapshots for n, s in sums.items()}


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _concat(chunks) -> dict[str, torch.Tensor]:
    chunks = list(chunks)
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}


def test_chunks_hold_the_same_samples_whatever_the_chunk_size() -> None:
    net = _net()
    post, _ = _walk(net, seed=1)
    whole = _concat(WeightStream([post], net).chunks(_spec(7, 0.5, None), run_seed=3))
    assert set(whole) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert whole["0.weight"].shape == (7, 4, 3) and whole["2.bias"].shape == (7, 2)
    for size in (1, 2, 3, 7, 50):
        chunks = list(WeightStream([post], net).chunks(_spec(7, 0.5, size), run_seed=3))
        assert len(chunks) == -(-7 // min(size, 7))
        for name, value in _concat(chunks).items():
            torch.testing.assert_close(value, whole[name])  # the same numbers, up to the matmul's rounding
    other_seed = _concat(WeightStream([post], net).chunks(_spec(7, 0.5, None), run_seed=4))
    assert not torch.equal(other_seed["0.weight"], whole["0.weight"])
    assert not torch.equal(whole["0.weight"][0], whole["0.weight"][1])


def test_scale_zero_gives_the_swa_mean_and_the_samples_spread_around_it() -> None:
    net = _net()
    post, mean = _walk(net, seed=2)
    stream = WeightStream([post], net)
    at_mean = _concat(stream.chunks(_spec(3, 0.0, None), run_seed=0))
    for name, value in at_mean.items():
        torch.testing.assert_close(value, mean[name].float().expand_as(value))
    for name, value in stream.mean_weights().items():
        torch.testing.assert_close(value[0], mean[name].float())
    spread = _concat(stream.chunks(_spec(2000, 1.0, None), run_seed=0))
    for name, value in spread.items():
        torch.testing.assert_close(value.double().mean(0), mean[name], atol=0.05, rtol=0)


def test_samples_take_each_parameters_dtype() -> None:
    net64 = _net(torch.float64)
    post, _ = _walk(net64, seed=3)
    chunk = _concat(WeightStream([post], net64).chunks(_spec(2, 1.0, None), run_seed=0))
    assert all(v.dtype == torch.float64 for v in chunk.values())
    mixed = _net()
    mixed[2].to(torch.bfloat16)
    post, _ = _walk(mixed, seed=3)
    chunk = _concat(WeightStream([post], mixed).chunks(_spec(2, 1.0, None), run_seed=0))
    assert chunk["0.weight"].dtype == torch.float32 and chunk["2.weight"].dtype == torch.bfloat16


def test_samples_that_fit_the_cache_are_kept_for_the_next_batch_of_the_same_run() -> None:
    net = _net()
    post, _ = _walk(net, seed=4)
    stream = WeightStream([post], net)
    spec = _spec(6, 1.0, None)
    assert stream.fits_cache(spec) and not stream.fits_cache(_spec(6, 1.0, 2))
    draws: list[int] = []

    def progress(chunks, total):
        draws.append(total)
        return chunks

    first = stream.chunks(spec, 5, progress=progress)
    assert stream.chunks(spec, 5, progress=progress) is first and draws == [1]  # drawn once
    assert stream.chunks(_spec(6, 1.0, None), 6, progress=progress) is not first and draws == [1, 1]
    stream.clear()
    again = stream.chunks(spec, 5)
    assert again is not first
    torch.testing.assert_close(again[0]["0.weight"], first[0]["0.weight"], rtol=0, atol=0)


def test_prepared_chunks_are_cached_under_their_key_and_bounded_runs_redraw() -> None:
    net = _net()
    post, _ = _walk(net, seed=5)
    stream = WeightStream([post], net)
    spec = _spec(4, 1.0, None)
    calls: list[str] = []

    def prepare(chunk):
        calls.append("prepare")
        return {name: value * 2 for name, value in chunk.items()}

    drawn = [dict(c) for c in stream.chunks(spec, 1)]
    prepared = stream.chunks(spec, 1, prepare=prepare, key="double")
    assert stream.chunks(spec, 1, prepare=prepare, key="double") is prepared and calls == ["prepare"]
    torch.testing.assert_close(prepared[0]["0.weight"], drawn[0]["0.weight"] * 2)
    bounded = _spec(4, 1.0, 2)  # an explicit chunk size below num_samples: memory bounded, never cached
    once, twice = list(stream.chunks(bounded, 1)), list(stream.chunks(bounded, 1))
    assert len(once) == 2 and once[0]["0.weight"] is not twice[0]["0.weight"]
    torch.testing.assert_close(torch.cat([c["0.weight"] for c in once]), drawn[0]["0.weight"])


def test_multiswag_streams_each_posterior_in_turn() -> None:
    net = _net()
    first, _ = _walk(net, seed=6)
    second, _ = _walk(net, seed=7)
    spec = _spec(3, 1.0, 2)
    both = WeightStream([first, second], net)
    assert both.num_chunks(spec) == 4
    chunks = list(both.chunks(spec, 8))
    alone = _concat(WeightStream([first], net).chunks(spec, 8))
    torch.testing.assert_close(_concat(chunks[:2])["0.weight"], alone["0.weight"])
    assert not torch.equal(_concat(chunks[2:])["0.weight"], alone["0.weight"])
    assert both.tracked_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
