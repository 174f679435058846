"""SWAGPosterior: moments, ring buffer, sampling and serialization against independent computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import expected_moments, flat_params
from torch import nn

from lightning_swag import SWAGPosterior


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _random_walk(net: nn.Module, post: SWAGPosterior, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    recorded = []
    for _ in range(steps):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        post.collect(net)
        recorded.append(flat_params(net).double())
    return recorded


@pytest.mark.parametrize("steps,max_rank", [(1, 5), (3, 5), (5, 5), (12, 5), (7, 3), (4, 0)])
def test_moments_and_deviation_rows_match_recorded_snapshots(steps: int, max_rank: int) -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=max_rank)
    recorded = _random_walk(net, post, steps)
    mean, var, rows = expected_moments(recorded, max_rank)
    assert post.num_snapshots == steps
    assert post.rank == min(steps, max_rank)
    torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(post.variance, var, rtol=1e-9, atol=1e-12)
    assert post.deviations.shape == (min(steps, max_rank), post.num_params)
    torch.testing.assert_close(post.deviations.double(), rows, rtol=1e-5, atol=1e-6)


def test_tracks_trainable_parameters_in_parameters_order_by_name() -> None:
    net = _net()
    net[0].bias.requires_grad_(False)
    post = SWAGPosterior.from_model(net)
    assert post.param_names == ["0.weight", "2.weight", "2.bias"]
    assert post.num_params == 12 + 8 + 2
    post.collect(net)
    torch.testing.assert_close(post.mean.float(), flat_params(net))


def test_include_patterns_select_a_subset() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, include=["2"])
    assert post.param_names == ["2.weight", "2.bias"]
    assert SWAGPosterior.from_model(net, include="*.bias").param_names == ["0.bias", "2.bias"]
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        SWAGPosterior.from_model(net, include=["head.*"])


def test_variance_is_never_negative_for_constant_weights() -> None:
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.1)  # 0.1 is not exact in binary: E[θ²] − E[θ]² may round below 0
    post = SWAGPosterior.from_model(net, max_rank=2, moment_dtype=torch.float32)
    for _ in range(9):
        post.collect(net)
    assert (post.variance >= 0).all()
    assert post.variance.max() < 1e-6


def test_deviation_buffer_is_allocated_once() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=3)
    ptr = post.statistics.deviations.data_ptr()
    _random_walk(net, post, 10)
    assert post.statistics.deviations.data_ptr() == ptr


def test_sample_covariance_matches_formula() -> None:
    net = nn.Linear(2, 2)  # P = 6
    post = SWAGPosterior.from_model(net, max_rank=4)
    _random_walk(net, post, 9, seed=3)
    k = post.rank
    dev = post.deviations.double()
    scale = 0.5
    expected_cov = scale * (torch.diag(post.variance) + dev.T @ dev / (k - 1))
    g = torch.Generator().manual_seed(0)
    samples = post.sample(400_000, scale=scale, generator=g)
    centered = samples - post.mean
    cov = centered.T @ centered / samples.shape[0]
    tol = 0.02 * expected_cov.diag().max().item()
    torch.testing.assert_close(samples.mean(0), post.mean, rtol=0, atol=tol)
    torch.testing.assert_close(cov, expected_cov, rtol=0, atol=tol)


@pytest.mark.parametrize("mode", ["max_rank_0", "diagonal"])
def test_diagonal_mode_has_diagonal_covariance(mode: str) -> None:
    net = nn.Linear(2, 2)
    post = SWAGPosterior.from_model(net, max_rank=0 if mode == "max_rank_0" else 4)
    _random_walk(net, post, 6, seed=4)
    g = torch.Generator().manual_seed(0)
    drawn = post.diagonal() if mode == "diagonal" else post
    samples = drawn.sample(300_000, scale=0.3, generator=g)
    centered = samples - post.mean
    cov = centered.T @ centered / samples.shape[0]
    expected = 0.3 * torch.diag(post.variance)
    torch.testing.assert_close(cov, expected, rtol=0, atol=0.02 * expected.max().item())


def test_rank_one_has_no_low_rank_term() -> None:
    net = nn.Linear(2, 1)
    post = SWAGPosterior.from_model(net, max_rank=5)
    _random_walk(net, post, 1)
    samples = post.sample(10, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()  # no division by k - 1 = 0


def test_sampling_is_reproducible_and_leaves_global_rng_alone() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=3)
    _random_walk(net, post, 5)
    state = torch.get_rng_state()
    a = post.sample(4, generator=torch.Generator().manual_seed(7))
    b = post.sample(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, post.sample(4, generator=torch.Generator().manual_seed(8)))


def test_scale_zero_returns_the_mean() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=3)
    _random_walk(net, post, 5)
    samples = post.sample(3, scale=0.0)
    assert torch.equal(samples, post.mean.expand(3, -1))


def test_state_dict_save_and_load_round_trip(tmp_path) -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=3)
    _random_walk(net, post, 7)
    path = tmp_path / "post.pt"
    post.save(path)
    loaded = SWAGPosterior.load(path)
    assert loaded.num_snapshots == 7 and loaded.max_rank == 3
    assert loaded.param_shapes == post.param_shapes
    torch.testing.assert_close(loaded.mean, post.mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.variance, post.variance, rtol=0, atol=0)
    torch.testing.assert_close(loaded.deviations, post.deviations, rtol=0, atol=0)
    # collecting continues the ring where it stopped: the same next snapshots give the same state
    net_copy = copy.deepcopy(net)
    _random_walk(net, post, 3, seed=9)
    _random_walk(net_copy, loaded, 3, seed=9)
    assert loaded.num_snapshots == post.num_snapshots == 10
    torch.testing.assert_close(loaded.deviations, post.deviations, rtol=0, atol=0)
    torch.testing.assert_close(loaded.variance, post.variance, rtol=0, atol=0)


def test_load_into_writes_the_mean_by_name() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=2)
    recorded = _random_walk(net, post, 4)
    fresh = _net()
    post.load_into(fresh)
    torch.testing.assert_close(flat_params(fresh).double(), torch.stack(recorded).mean(0), rtol=0, atol=1e-6)


def test_errors_are_clear() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=2)
    with pytest.raises(RuntimeError, match="no snapshots"):
        post.sample(3)
    with pytest.raises(RuntimeError, match="no snapshots"):
        _ = post.mean
    with pytest.raises(ValueError, match="max_rank"):
        SWAGPosterior.from_model(net, max_rank=-1)
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="does not match"):
        post.check_compatible(other)
    with pytest.raises(ValueError, match="shape"):
        post.collect(other)
    with torch.no_grad():
        net[2].bias[0] = math.nan
    with pytest.raises(FloatingPointError, match="2.bias"):
        post.collect(net)
    assert post.num_snapshots == 0  # nothing was added
    post.collect(_net())
    with pytest.raises(ValueError, match="num_samples"):
        post.sample(0)
    with pytest.raises(ValueError, match="scale"):
        post.sample(2, scale=-1.0)


def test_float32_moments_keep_a_small_spread_around_a_large_value() -> None:
    """Weights near 0.5 moving by ~1e-4: E[θ²] − E[θ]² cancels catastrophically in float32."""
    g = torch.Generator().manual_seed(0)
    snapshots = [0.5 + 1e-4 * torch.randn(2000, generator=g, dtype=torch.float64) for _ in range(40)]
    shapes = {"w": (2000,)}
    post32 = SWAGPosterior(shapes, max_rank=5, moment_dtype=torch.float32)
    for theta in snapshots:
        post32.collect_flat(theta.float())
    stack = torch.stack([s.float().double() for s in snapshots])  # what the float32 model holds
    want = stack.var(0, correction=0)
    got = post32.variance.double()
    assert int((got == 0).sum()) == 0
    relative = ((got - want).abs() / want).median()
    assert relative < 1e-3, relative
    torch.testing.assert_close(post32.mean.double(), stack.mean(0), rtol=0, atol=1e-6)


def test_damaged_posterior_files_name_the_file(tmp_path) -> None:
    net = _net()
    post = SWAGPosterior.from_model(net)
    post.collect(net)
    good = tmp_path / "good.pt"
    post.save(good)
    data = good.read_bytes()
    damaged = {
        "empty.pt": b"",
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": b"this is not a posterior\n" * 10,
    }
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}.*not a readable SWAG posterior"):
            SWAGPosterior.load(tmp_path / name)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt.*not a SWAG posterior"):
        SWAGPosterior.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        SWAGPosterior.load(tmp_path / "missing.pt")


def _walked_posterior(shapes: dict[str, tuple[int, ...]], snapshots: int, max_rank: int) -> SWAGPosterior:
    post = SWAGPosterior(shapes, max_rank=max_rank)
    g = torch.Generator().manual_seed(3)
    for _ in range(snapshots):
        post.collect_flat(torch.randn(post.num_params, generator=g, dtype=torch.float64))
    return post


@pytest.mark.parametrize("num_params", [7, 3000, 16384, 40_000 + 17])
def test_a_seed_gives_the_same_samples_in_any_chunking(num_params: int) -> None:
    """Sample i of a seed does not depend on which other samples are drawn with it."""
    post = _walked_posterior({"w": (num_params,)}, snapshots=5, max_rank=4)
    whole = post.sample(6, seed=11, dtype=torch.float32)
    parts = [
        post.sample(n, seed=11, first_sample=start, dtype=torch.float32)
        for start, n in [(0, 1), (1, 3), (4, 2)]
    ]
    # the noise is identical; the low-rank product may round in the last bit with another row count
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=2e-6)
    # float64 results use the same noise, so they agree with the float32 ones to float32 rounding
    torch.testing.assert_close(post.sample(6, seed=11).float(), whole, rtol=1e-5, atol=1e-5)
    assert not torch.equal(post.sample(6, seed=12, dtype=torch.float32), whole)


@pytest.mark.parametrize("num_params", [50, 3000, 3 * 16384 + 5])
def test_any_column_range_draws_its_own_part_of_the_noise_table(num_params: int) -> None:
    from lightning_swag.posterior.noise import StandardNormalTiles

    tiles = StandardNormalTiles(seed=5, num_params=num_params, rank=3, device="cpu")
    whole = tiles.diagonal(torch.empty(4, num_params), first_sample=2)
    for start, stop in [(0, num_params // 3), (num_params // 3, num_params), (1, num_params - 1)]:
        part = StandardNormalTiles(5, num_params, 3, "cpu").diagonal(torch.empty(3, stop - start), 3, start)
        torch.testing.assert_close(part, whole[1:4, start:stop], rtol=0, atol=0)
    low = StandardNormalTiles(5, num_params, 3, "cpu").low_rank(2, 4)
    torch.testing.assert_close(
        StandardNormalTiles(5, num_params, 3, "cpu").low_rank(4, 2), low[2:], rtol=0, atol=0
    )
    # the table really is standard normal and its rows independent of each other
    big = StandardNormalTiles(9, num_params, 3, "cpu").diagonal(torch.empty(64, min(num_params, 4096)), 0)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(big[:, :32].T).triu(1).abs().max())) < 0.6


def test_sampling_with_a_generator_draws_the_seed_from_it() -> None:
    post = _walked_posterior({"w": (9,)}, snapshots=4, max_rank=3)
    a = post.sample(5, generator=torch.Generator().manual_seed(0))
    b = post.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="either seed or generator"):
        post.sample(2, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed"):
        post.sample(2, seed=-3)


def test_nbytes_counts_the_statistics() -> None:
    post = _walked_posterior({"w": (1000,)}, snapshots=3, max_rank=4)
    assert post.nbytes == 3 * 1000 * 8 + 4 * 1000 * 4  # mean, M2, scratch (float64) + deviations
    post.sample(2, seed=0, dtype=torch.float32)
    assert post.nbytes == 3 * 1000 * 8 + 4 * 1000 * 4 + 2 * 1000 * 4  # + cached float32 mean and std


def test_format_1_files_are_still_read(tmp_path) -> None:
    post = _walked_posterior({"a": (3, 2), "b": (4,)}, snapshots=6, max_rank=4)
    old = {
        "format_version": 1,
        "param_shapes": {"a": [3, 2], "b": [4]},
        "max_rank": 4,
        "num_snapshots": 6,
        "mean": post.mean,
        "sq_mean": post.second_moment,
        "deviations": post.state_dict()["deviations"].clone(),
    }
    torch.save(old, tmp_path / "v1.pt")
    loaded = SWAGPosterior.load(tmp_path / "v1.pt")
    torch.testing.assert_close(loaded.variance, post.variance, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loaded.deviations, post.deviations, rtol=0, atol=0)


def test_the_noise_does_not_depend_on_the_number_of_threads() -> None:
    from lightning_swag.posterior.noise import COLUMNS_PER_STREAM as NOISE_BLOCK

    post = _walked_posterior({"w": (2 * NOISE_BLOCK + 17,)}, snapshots=3, max_rank=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = post.sample(3, seed=4, dtype=torch.float32)
        torch.set_num_threads(3)
        parallel = post.sample(3, seed=4, dtype=torch.float32)
        with torch.inference_mode():  # as in Lightning's predict loop: the worker threads follow
            in_inference = post.sample(3, seed=4, dtype=torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)
    assert torch.equal(serial, in_inference)
