"""Drawing samples from SWAG statistics (lightning_swag.posterior.sampling): argument checks, seeds,
chunking, the diagonal-only draw and sharded layouts."""

from __future__ import annotations

import pytest
import torch
from conftest import random_walk_posterior
from torch import nn

from lightning_swag.posterior.sampling import draw_local, refuse_sharded, resolve_seed
from lightning_swag.posterior.sharding import DDPSliceLayout, WholeLayout


def posterior():
    torch.manual_seed(0)
    return random_walk_posterior(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), snapshots=6)


def draw(post, n: int, first: int = 0, low_rank: bool = True, **kw):
    options = {
        "scale": 0.5,
        "generator": None,
        "seed": 11,
        "first_sample": first,
        "dtype": None,
        "device": None,
    }
    options.update(kw)
    return draw_local(post.statistics, post.layout, n, low_rank=low_rank, **options)


def test_a_seed_and_a_generator_are_exclusive_and_the_global_rng_is_left_alone() -> None:
    with pytest.raises(ValueError, match="either seed or generator"):
        resolve_seed(3, torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    first = resolve_seed(None, torch.Generator().manual_seed(5))
    assert first == resolve_seed(None, torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.random.get_rng_state())
    assert resolve_seed(7, None) == 7
    with pytest.raises(ValueError):
        resolve_seed(-1, None)


def test_a_sample_is_the_same_in_any_chunking() -> None:
    post = posterior()
    whole = draw(post, 6)
    parts = torch.cat([draw(post, 2, first=0), draw(post, 3, first=2), draw(post, 1, first=5)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)  # the same noise; matmul rounding only
    assert not torch.equal(draw(post, 2, seed=12), whole[:2])


def test_the_diagonal_draw_leaves_out_exactly_the_low_rank_term() -> None:
    post = posterior()
    full, diagonal = draw(post, 8, dtype=torch.float64), draw(post, 8, low_rank=False, dtype=torch.float64)
    rows = post.deviations.double()  # [k, P]
    difference = full - diagonal  # sqrt(scale) * D^T z2 / sqrt(k - 1): in the span of the deviation rows
    coefficients = torch.linalg.lstsq(rows.T, difference.T).solution
    torch.testing.assert_close(rows.T @ coefficients, difference.T, atol=1e-10, rtol=0)
    assert difference.abs().max() > 1e-3  # the low-rank term is there at all


def test_scale_zero_gives_the_mean_and_arguments_are_checked() -> None:
    post = posterior()
    zero = draw(post, 3, scale=0.0, dtype=torch.float64)
    torch.testing.assert_close(zero, post.mean.double().expand(3, -1), rtol=0, atol=0)
    assert draw(post, 2, dtype=torch.float32).dtype == torch.float32
    for bad in ({"scale": -1.0}, {"first": -1}):
        with pytest.raises(ValueError):
            draw(post, 2, **bad)
    with pytest.raises(ValueError, match="num_samples"):
        draw(post, 0)


def test_sharded_layouts_need_a_seed_and_refuse_whole_samples() -> None:
    shapes = {"w": torch.Size([4, 3]), "b": torch.Size([4])}
    refuse_sharded(WholeLayout(shapes))  # nothing to refuse
    with pytest.raises(ValueError, match="sample_local"):
        refuse_sharded(DDPSliceLayout.build(shapes, world_size=2, rank=1))
    post = posterior()
    sliced = DDPSliceLayout.build(post.param_shapes, world_size=2, rank=0)
    with pytest.raises(ValueError, match="needs seed"):
        draw_local(
            post.statistics,
            sliced,
            2,
            0.5,
            None,
            seed=None,
            first_sample=0,
            dtype=None,
            device=None,
            low_rank=True,
        )
