"""Sharded SWAG (issue 12): layouts, slicing and noise equivalence in one process; DDP
``shard=True`` and FSDP2 under ``ModelParallelStrategy`` on 2 CPU processes (gloo).

The 2-process checks share one launch of ``sharded_script.py`` (see its docstring for what each
file holds): the posterior joined into one file equals the single-process posterior of the same
snapshots, ``nbytes`` per process is about half, resuming from the checkpoint ends at the
uninterrupted posterior, the sharded samples are the unsharded ones and follow the covariance
formula, and BMA under the strategy equals a single-process BMA (``scale=0``: the SWA model).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import sharded_script as script
import torch
from conftest import run_two_process_script

from lightning_swag import SWAGModule, SWAGPosterior
from lightning_swag.posterior.format import (
    SHARDED_DESCRIPTION_KEY,
    load_distributed_checkpoint,
    load_file,
    posterior_state_from_entries,
    posterior_states,
    sharded_statistic_key,
)
from lightning_swag.posterior.sharding import Layout, chunk_rows

SCRIPT = Path(__file__).parents[1] / "sharded_script.py"
SHAPES = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (5, 3), "b.bias": (5,), "c.weight": (1, 5)}


# ---------------------------------------------------------------------- one process: layouts
def _join(parts: list[torch.Tensor], layouts: list[Layout]) -> torch.Tensor:
    """The processes' columns ``[..., num_local]`` put back into ``[..., P]`` by their pieces."""
    out = parts[0].new_full((*parts[0].shape[:-1], layouts[0].num_params), float("nan"))
    for part, layout in zip(parts, layouts, strict=True):
        for piece in layout.pieces:
            out[..., piece.start : piece.start + piece.count] = part[
                ..., piece.local : piece.local + piece.count
            ]
    return out


def _row_layouts(shapes: dict[str, tuple[int, ...]], world: int) -> list[Layout]:
    """FSDP2-like layouts (``torch.chunk`` of every parameter's rows) without processes."""
    return [
        Layout.from_row_shards(shapes, {n: chunk_rows(s[0], world, r) for n, s in shapes.items()})
        for r in range(world)
    ]


@pytest.mark.parametrize("rows", range(0, 12))
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_chunk_rows_gives_torch_chunk_parts(rows: int, world: int) -> None:
    parts = torch.arange(rows).chunk(world) if rows else ()
    for rank in range(world):
        first, count = chunk_rows(rows, world, rank)
        expected = parts[rank].tolist() if rank < len(parts) else []
        assert list(range(first, first + count)) == expected


@pytest.mark.parametrize("world", [2, 3, 8])
def test_ddp_slices_cut_the_flat_vector_like_torch_chunk(world: int) -> None:
    total = sum(math.prod(s) for s in SHAPES.values())
    flat = torch.arange(total, dtype=torch.float64)
    layouts = [Layout.ddp_slice(SHAPES, world, r) for r in range(world)]
    expected = list(flat.chunk(world)) + [flat[:0]] * world
    for rank, layout in enumerate(layouts):
        assert torch.equal(layout.take(flat), expected[rank])
        assert len(layout.spans) <= 1  # one contiguous run: one noise range, one copy
        # each piece is the right part of its parameter
        offset = dict(zip(SHAPES, [0, 12, 15, 30, 35], strict=True))
        for piece in layout.pieces:
            assert piece.start == offset[piece.name] + piece.within
    assert torch.equal(_join([lay.take(flat) for lay in layouts], layouts), flat)


@pytest.mark.parametrize("world", [2, 3])
def test_row_shards_hold_every_row_once_with_empty_pieces_kept(world: int) -> None:
    total = sum(math.prod(s) for s in SHAPES.values())
    flat = torch.arange(total, dtype=torch.float64)
    layouts = _row_layouts(SHAPES, world)
    assert torch.equal(_join([lay.take(flat) for lay in layouts], layouts), flat)
    named = {
        n: flat[a : a + math.prod(s)].view(s)
        for n, s, a in zip(SHAPES, SHAPES.values(), [0, 12, 15, 30, 35], strict=True)
    }
    for rank, layout in enumerate(layouts):
        assert [p.name for p in layout.pieces] == list(SHAPES)  # every parameter, empty or not
        for piece, source in zip(layout.pieces, layout.sources(named), strict=True):
            rows = named[piece.name].chunk(world)
            local = rows[rank] if rank < len(rows) else named[piece.name][:0]
            assert piece.local_shape == tuple(local.shape)
            assert torch.equal(source, local.reshape(-1))
    assert _row_layouts(SHAPES, 2)[1].pieces[-1].count == 0  # the (1, 5) weight: empty on rank 1


def _posteriors(shapes: dict[str, tuple[int, ...]], layouts: list[Layout], dtype: torch.dtype, n: int = 5):
    """An unsharded posterior and one per layout, fed the same ``n`` snapshots (``collect`` with whole
    tensors for the sharded ones, ``collect_flat`` for the unsharded one)."""
    g = torch.Generator().manual_seed(0)
    whole = SWAGPosterior(shapes, max_rank=3, moment_dtype=dtype, deviation_dtype=dtype)
    parts = [
        SWAGPosterior(shapes, 3, moment_dtype=dtype, deviation_dtype=dtype, layout=lay) for lay in layouts
    ]
    total = whole.num_params
    for _ in range(n):
        theta = torch.randn(total, generator=g, dtype=torch.float64) * 0.1 + 1.0
        whole.collect_flat(theta)
        named = whole.unflatten(theta)
        for part in parts:
            part.collect(named)
    return whole, parts


@pytest.mark.parametrize(
    "shapes", [SHAPES, {"w": (300, 70), "b": (300,), "v": (7, 301)}], ids=["small", "several-noise-blocks"]
)
@pytest.mark.parametrize("kind", ["ddp3", "rows2", "rows3"])
def test_sharded_statistics_and_samples_are_the_unsharded_ones(shapes, kind) -> None:
    world = int(kind[-1])
    layouts = (
        [Layout.ddp_slice(shapes, world, r) for r in range(world)]
        if kind.startswith("ddp")
        else _row_layouts(shapes, world)
    )
    whole, parts = _posteriors(shapes, layouts, torch.float64)
    for stat in ("mean", "variance", "deviations"):
        joined = _join([getattr(p, stat) for p in parts], layouts)
        assert torch.equal(joined, getattr(whole, stat)), stat
    # the noise of a column does not depend on the sharding: the diagonal part is bitwise equal
    for dtype in (torch.float64, torch.float32):
        kwargs = {"seed": 7, "dtype": dtype}
        diag = _join([p.diagonal().sample_local(6, 0.5, **kwargs) for p in parts], layouts)
        assert torch.equal(diag, whole.diagonal().sample(6, 0.5, **kwargs))
        # with the low-rank term only the matmul's summation order may differ; any chunking
        chunked = [
            torch.cat(
                [
                    p.sample_local(4, 0.5, first_sample=0, **kwargs),
                    p.sample_local(2, first_sample=4, **kwargs),
                ]
            )
            for p in parts
        ]
        atol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(_join(chunked, layouts), whole.sample(6, 0.5, **kwargs), rtol=0, atol=atol)
    # statistics are all per column: the parts' bytes add up to the unsharded posterior's
    assert sum(p.nbytes for p in parts) == whole.nbytes
    assert sum(p.num_local_params for p in parts) == whole.num_params


def test_a_sharded_posterior_keeps_its_part_of_a_whole_state_and_refuses_whole_vector_operations() -> None:
    layouts = [Layout.ddp_slice(SHAPES, 2, r) for r in range(2)]
    whole, _ = _posteriors(SHAPES, [], torch.float64)
    part = SWAGPosterior(SHAPES, 3, deviation_dtype=torch.float64, layout=layouts[1])
    part.load_state_dict(whole.state_dict())
    assert part.num_snapshots == whole.num_snapshots and part.is_sharded
    assert torch.equal(part.mean, layouts[1].take(whole.mean))
    assert torch.equal(part.deviations, layouts[1].take(whole.deviations))
    assert "sharded" in repr(part)
    with pytest.raises(ValueError, match="sample_local"):
        part.sample(2, seed=0)
    with pytest.raises(ValueError, match="same on every process"):
        part.sample_local(2)  # no seed: each process would draw from another noise table
    with pytest.raises(ValueError, match="gather"):
        part.state_dict()
    model = torch.nn.ModuleDict(
        {"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(3, 5), "c": torch.nn.Linear(5, 1, bias=False)}
    )
    with pytest.raises(ValueError, match="gather"):
        part.load_into(model)  # a slice cannot fill a whole model
    with pytest.raises(ValueError, match="layout does not describe"):
        SWAGPosterior({"other": (2,)}, 3, layout=layouts[0])


def test_sharded_statistics_entries_rebuild_the_whole_posterior() -> None:
    """The per-parameter form of a distributed checkpoint (consolidated, or read by
    load_distributed_checkpoint) gives back the posterior, bit for bit."""
    whole, _ = _posteriors(SHAPES, [], torch.float64)
    prefix = "_swag/SWAGCallback/"
    entries = {}
    for stat, flat in (("mean", whole.mean), ("sum_sq_dev", whole.state_dict()["sum_sq_dev"])):
        entries.update({sharded_statistic_key(prefix, stat, n): t for n, t in whole.unflatten(flat).items()})
    rows = whole.state_dict()["deviations"]
    entries.update(
        {sharded_statistic_key(prefix, "deviations", n): t for n, t in whole.unflatten(rows).items()}
    )
    description = {
        "prefix": prefix,
        "format_version": 2,
        "param_shapes": {n: list(s) for n, s in SHAPES.items()},
        "max_rank": 3,
        "num_snapshots": whole.num_snapshots,
        "moment_dtype": "float64",
        "deviation_dtype": "float64",
    }
    checkpoint = {
        "callbacks": {"SWAGCallback": {SHARDED_DESCRIPTION_KEY: description}},
        "state_dict": entries,
    }
    (state,) = posterior_states(checkpoint)
    rebuilt = SWAGPosterior.from_state_dict(state)
    for stat in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(rebuilt, stat), getattr(whole, stat)), stat
    assert torch.equal(SWAGPosterior.from_sharded_entries(description, entries).mean, whole.mean)
    with pytest.raises(ValueError, match="load_distributed_checkpoint"):
        posterior_state_from_entries(description, {})  # meta.pt read alone


# ---------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """Run the 2-process script once (DDP, then FSDP2); its files are shared by the tests below."""
    out = tmp_path_factory.mktemp("sharded")
    run_two_process_script([str(SCRIPT), str(out)], "sharded run", timeout=420)
    return out


def _load(path: Path):
    return torch.load(path, weights_only=False)


def _single_process_posterior(snapshots: list[torch.Tensor], shapes) -> SWAGPosterior:
    single = SWAGPosterior(shapes, script.MAX_RANK)
    for theta in snapshots:
        single.collect_flat(theta)
    return single


def _trained_model(out: Path, kind: str) -> script.Wide:
    """The trained weights, whole: DDP ranks hold them all, FSDP2 ranks hold row shards."""
    weights = [_load(out / f"{kind}_fit_rank{r}.pt")["weights"] for r in (0, 1)]
    model = script.Wide()
    state = (
        weights[0] if kind == "ddp" else {n: torch.cat([weights[0][n], weights[1][n]]) for n in weights[0]}
    )
    model.load_state_dict(state)
    return model.eval()


def _gathered_predictions(out: Path, kind: str, tag: str, n: int) -> tuple[dict[str, torch.Tensor], list]:
    rows: dict[int, dict[str, torch.Tensor]] = {}
    seeds = []
    for rank in (0, 1):
        written = _load(out / f"{kind}_pred_{tag}_rank{rank}.pt")
        seeds.append(written["run_seed"])
        (indices,) = written["batch_indices"]
        for batch, pred in zip(indices, written["predictions"], strict=True):
            for row, index in enumerate(batch):
                rows[index] = {k: v[row] for k, v in pred.items()}
    assert sorted(rows) == list(range(n))
    keys = rows[0].keys()
    return {k: torch.stack([rows[i][k] for i in range(n)]) for k in keys}, seeds


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_one_file_equals_the_single_process_posterior_and_each_process_holds_half(sharded_run, kind) -> None:
    fits = [_load(sharded_run / f"{kind}_fit_rank{r}.pt") for r in (0, 1)]
    whole = SWAGPosterior.load(sharded_run / f"{kind}_posterior.pt")
    assert not whole.is_sharded and whole.num_params == 1251
    for a, b in zip(fits[0]["snapshots"], fits[1]["snapshots"], strict=True):
        assert torch.equal(a, b)
    single = _single_process_posterior(fits[0]["snapshots"], whole.param_shapes)
    assert whole.num_snapshots == single.num_snapshots == script.MAX_EPOCHS - script.START_EPOCH
    for stat in ("mean", "variance", "deviations"):
        torch.testing.assert_close(getattr(whole, stat), getattr(single, stat), rtol=0, atol=1e-6)
        assert torch.equal(getattr(whole, stat), getattr(single, stat)), stat  # in fact bit for bit

    # each process keeps its own part: DDP a slice of the flat vector, FSDP2 its rows of each weight
    flat = torch.arange(whole.num_params)
    if kind == "ddp":
        expected = [part.tolist() for part in flat.chunk(2)]
    else:
        expected = [[], []]
        for piece in whole.unflatten(flat).values():
            for rank, rows in enumerate(piece.chunk(2)):
                expected[rank] += rows.reshape(-1).tolist()
    for rank, fit in enumerate(fits):
        assert fit["is_sharded"]
        assert [i for a, b in fit["ranges"] for i in range(a, b)] == expected[rank]
        assert fit["nbytes"] == fit["local_tensor_bytes"]
        assert fit["nbytes"] <= 0.55 * single.nbytes, (rank, fit["nbytes"] / single.nbytes)
    assert fits[0]["nbytes"] + fits[1]["nbytes"] == single.nbytes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_resuming_from_the_checkpoint_ends_at_the_uninterrupted_posterior(sharded_run, kind) -> None:
    whole = SWAGPosterior.load(sharded_run / f"{kind}_posterior.pt")
    resumed = SWAGPosterior.load(sharded_run / f"{kind}_posterior_resumed.pt")
    assert resumed.num_snapshots == whole.num_snapshots
    for stat in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(resumed, stat), getattr(whole, stat)), stat
    for rank in (0, 1):
        trained = _load(sharded_run / f"{kind}_fit_rank{rank}.pt")["weights"]
        again = _load(sharded_run / f"{kind}_resumed_rank{rank}.pt")["weights"]
        assert all(torch.equal(trained[n], again[n]) for n in trained)

    # the mid-run checkpoint holds the posterior of the first snapshots
    snapshots = _load(sharded_run / f"{kind}_fit_rank0.pt")["snapshots"]
    at_checkpoint = _single_process_posterior(
        snapshots[: script.CKPT_EPOCHS - script.START_EPOCH], whole.param_shapes
    )
    path = sharded_run / f"{kind}_ckpt" / "mid.ckpt"
    if kind == "ddp":  # one file, today's format: the whole posterior, gathered to rank 0
        (state,) = posterior_states(load_file(path))
    else:  # a folder: every process wrote its part next to its weight shards
        from torch.distributed.checkpoint import FileSystemReader

        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= set(os.listdir(path))
        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        swag_keys = {k for k in keys if k.startswith("state_dict._swag/SWAGCallback/")}
        assert len(swag_keys) == 3 * len(whole.param_shapes)  # mean, sum_sq_dev, deviations per weight
        meta = load_file(path / "meta.pt")["callbacks"]["SWAGCallback"]
        assert meta["posterior"] is None and meta[SHARDED_DESCRIPTION_KEY]["num_snapshots"] == 2
        (state,) = posterior_states(load_distributed_checkpoint(path))  # one process, no process group
    saved = SWAGPosterior.from_state_dict(state)
    for stat in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(saved, stat), getattr(at_checkpoint, stat)), stat


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_sharded_samples_are_the_unsharded_ones_and_follow_the_covariance_formula(sharded_run, kind) -> None:
    whole = SWAGPosterior.load(sharded_run / f"{kind}_posterior.pt")
    samples = [_load(sharded_run / f"{kind}_samples_rank{r}.pt")["samples"] for r in (0, 1)]
    assert torch.equal(samples[0], samples[1])
    reference = whole.sample(script.NUM_SAMPLES, 0.5, seed=script.SEED, dtype=torch.float64)
    torch.testing.assert_close(samples[0], reference, rtol=0, atol=1e-12)

    got = _load(sharded_run / f"{kind}_cov.pt")
    columns = got["columns"]
    variance, factor = whole.covariance_factors()
    assert factor is not None
    formula = torch.diag(variance[columns]) + factor[:, columns].T @ factor[:, columns]
    error = float((got["cov"] - formula).norm() / formula.norm())
    assert error < 0.05, error  # 20,000 samples: about 0.02 expected


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_bma_under_the_strategy_equals_single_process_bma(sharded_run, kind) -> None:
    model = _trained_model(sharded_run, kind)
    whole = SWAGPosterior.load(sharded_run / f"{kind}_posterior.pt")
    x = script.predict_inputs()

    # scale 0: the SWA model
    swa = whole.load_into(script.Wide().eval())
    predicted, _ = _gathered_predictions(sharded_run, kind, "s0", len(x))
    with torch.no_grad():
        torch.testing.assert_close(predicted["mean"], swa(x), rtol=0, atol=1e-6)

    # scale 0.5: the BMA of one process with the same posterior and seed
    predicted, _ = _gathered_predictions(sharded_run, kind, "s05", len(x))
    single = SWAGModule(model, whole, num_samples=script.NUM_SAMPLES, scale=0.5, seed=script.SEED)
    expected = single(x)
    for key in ("mean", "std"):
        torch.testing.assert_close(predicted[key], expected[key], rtol=0, atol=1e-6)

    # the unsharded posterior of the one file, kept in part by each process for FSDP2: the same
    predicted_from_file, _ = _gathered_predictions(sharded_run, kind, "file", len(x))
    torch.testing.assert_close(predicted_from_file["mean"], predicted["mean"], rtol=0, atol=1e-6)
    if kind == "ddp":  # a SWAGModule checkpoint written under DDP holds the whole posterior
        (state,) = posterior_states(load_file(sharded_run / "ddp_bma.ckpt"))
        assert torch.equal(SWAGPosterior.from_state_dict(state).mean, whole.mean)

    # no seed, uneven batches (2 on rank 0, 1 on rank 1; for DDP gathered per batch): rank 0's seed
    predicted, seeds = _gathered_predictions(sharded_run, kind, "uneven", 17)
    assert seeds[0] is not None and seeds[0] == seeds[1]
    single = SWAGModule(model, whole, num_samples=script.NUM_SAMPLES, scale=0.5, seed=seeds[0])
    torch.testing.assert_close(
        predicted["mean"], single(script.predict_inputs(17))["mean"], rtol=0, atol=1e-6
    )

    # prediction leaves the trained weights as they were (FSDP2 writes samples into the shards)
    for rank in (0, 1):
        trained = _load(sharded_run / f"{kind}_fit_rank{rank}.pt")["weights"]
        after = _load(sharded_run / f"{kind}_after_predict_rank{rank}.pt")["weights"]
        assert all(torch.equal(trained[n], after[n]) for n in trained)


# ---------------------------------------------------------------------- FSDP2 in one process
@pytest.fixture
def one_process_group():
    """A gloo process group of one process (FSDP2 runs on a 1-process mesh: every shard is whole)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_posterior_checkpoint_views_and_in_place_bma_in_one_process(
    one_process_group, tmp_path
) -> None:
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = script.Wide()
    model = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model.net[0], mesh=mesh)
    with pytest.raises(ValueError, match="not sharded"):
        SWAGPosterior.from_model(model)  # only some parameters are DTensors
    fully_shard(model, mesh=mesh)
    post = SWAGPosterior.from_model(model, max_rank=3)
    reference = SWAGPosterior.from_model(plain, max_rank=3)
    assert post.layout.forward_in_place and not reference.is_sharded
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():
            for p, q in zip(plain.parameters(), model.parameters(), strict=True):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
                q.to_local().copy_(p)
        post.collect(model)
        reference.collect(plain)
    for stat in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(post, stat), getattr(reference, stat)), stat
        assert torch.equal(getattr(post.gather(), stat), getattr(reference, stat)), stat

    # DTensor views: a distributed checkpoint round trip fills a new posterior in place
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": post.sharded_state_dict("_swag/x/")}, checkpoint_id=tmp_path)
    again = SWAGPosterior.from_distributed_checkpoint(tmp_path, post.sharded_description("_swag/x/"), model)
    for stat in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(again, stat), getattr(reference, stat)), stat

    # BMA on the FSDP2 model (samples copied into the shards in place) = functional BMA on the plain one
    trained = {n: p.to_local().clone() for n, p in model.named_parameters()}
    x = script.predict_inputs()
    got = SWAGModule(model, post, num_samples=5, seed=3, chunk_size=2)(x)
    want = SWAGModule(plain, reference, num_samples=5, seed=3, chunk_size=2)(x)
    for key in ("mean", "std"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert all(torch.equal(p.to_local(), trained[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="does not fit"):
        SWAGModule(plain, post)  # a posterior of shards needs the sharded model
    post.load_into(model)  # the SWA weights, into the local shards
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.load_into(plain)(x), rtol=0, atol=1e-6)


def test_fsdp2_sharding_other_than_shard0_on_one_mesh_dimension_is_refused(one_process_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = script.Wide()
    fully_shard(model, mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard")))  # HSDP
    with pytest.raises(ValueError, match="Shard\\(0\\) over one data-parallel mesh dimension"):
        SWAGPosterior.from_model(model)


def test_shard_must_be_a_bool_and_is_a_no_op_with_one_process() -> None:
    import lightning as L
    from conftest import QUIET, TinyRegressor, tiny_loader

    from lightning_swag import SWAGCallback

    with pytest.raises(ValueError, match="shard must be one of True, False"):
        SWAGCallback(shard="yes")  # type: ignore[arg-type]
    swag = SWAGCallback(max_rank=2, shard=True)
    L.Trainer(max_epochs=2, callbacks=[swag], **QUIET).fit(TinyRegressor(), tiny_loader())
    assert not swag.posterior.is_sharded and swag.posterior.num_snapshots == 2
