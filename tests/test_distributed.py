"""Distributed training: DDP (2 CPU processes, gloo) gives every rank the same posterior, equal to
the single-process posterior of the same snapshots; BMA prediction runs under DDP; the sharded
strategies SWAG does not support (FSDP1, DeepSpeed) are refused with a clear error, while
``ModelParallelStrategy`` (FSDP2) passes (sharded SWAG itself is tested in ``test_sharded.py``).

The DDP run is ``ddp_train_script.py`` launched as a subprocess with ``strategy="ddp"`` (Lightning
re-runs the script for rank 1), which is how DDP is used in practice and keeps the posterior in
the training process after ``fit`` (unlike ``ddp_spawn``, which sends only rank 0's weights back).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import ddp_train_script as script
import lightning as L
import pytest
import torch
from conftest import QUIET, TinyRegressor, run_two_process_script
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from torch.utils.data import DataLoader

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior

SCRIPT = Path(__file__).with_name("ddp_train_script.py")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Run the 2-process DDP script once; its per-rank files are shared by the tests below."""
    out = tmp_path_factory.mktemp("ddp")
    run_two_process_script([str(SCRIPT), str(out)], "DDP run", timeout=240)
    return out


def _load(path: Path):
    return torch.load(path, weights_only=False)


@pytest.mark.slow
def test_ddp_ranks_hold_identical_posteriors_equal_to_single_process(ddp_run: Path) -> None:
    fits = [_load(ddp_run / f"fit_rank{r}.pt") for r in (0, 1)]
    posts = [SWAGPosterior.load(ddp_run / f"posterior_rank{r}.pt") for r in (0, 1)]
    assert fits[0]["world_size"] == 2

    # the ranks really trained on different halves of the data in every epoch (DistributedSampler)...
    assert fits[0]["seen"].keys() == fits[1]["seen"].keys() == set(range(script.MAX_EPOCHS))
    for epoch in range(script.MAX_EPOCHS):
        seen = [set(f["seen"][epoch]) for f in fits]
        assert len(seen[0]) == len(seen[1]) == 64
        assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(128))
    # ...yet recorded identical weights at every collected epoch (DDP averages the gradients)
    expected_snapshots = script.MAX_EPOCHS - script.START_EPOCH
    assert len(fits[0]["snapshots"]) == len(fits[1]["snapshots"]) == expected_snapshots
    for a, b in zip(fits[0]["snapshots"], fits[1]["snapshots"], strict=True):
        assert torch.equal(a, b)

    # both ranks hold the same posterior, bit for bit
    for post in posts:
        assert post.num_snapshots == expected_snapshots and post.rank == script.MAX_RANK
    assert torch.equal(posts[0].mean, posts[1].mean)
    assert torch.equal(posts[0].second_moment, posts[1].second_moment)
    assert torch.equal(posts[0].variance, posts[1].variance)
    assert torch.equal(posts[0].deviations, posts[1].deviations)

    # and it is the posterior a single process builds from the snapshots each rank recorded itself
    for fit, post in zip(fits, posts, strict=True):
        single = SWAGPosterior(post.param_shapes, script.MAX_RANK)
        for theta in fit["snapshots"]:
            single.collect_flat(theta)
        assert single.num_snapshots == post.num_snapshots
        torch.testing.assert_close(post.mean, single.mean, rtol=0, atol=0)
        torch.testing.assert_close(post.variance, single.variance, rtol=0, atol=0)
        torch.testing.assert_close(post.deviations, single.deviations, rtol=0, atol=0)


@pytest.mark.slow
def test_ddp_predict_returns_the_local_shard_and_the_writer_gathers_all(ddp_run: Path) -> None:
    written = [_load(ddp_run / f"written_rank{r}.pt") for r in (0, 1)]
    returned = [_load(ddp_run / f"returned_rank{r}.pt")["returned"] for r in (0, 1)]

    # trainer.predict under DDP returns, on each rank, only that rank's batches
    indices = []
    for rank in (0, 1):
        (rank_indices,) = written[rank]["batch_indices"]  # one predict dataloader
        flat = [i for batch in rank_indices for i in batch]
        assert flat == list(range(rank, 40, 2))  # UnrepeatedDistributedSampler: every 2nd input
        indices.append(flat)
        assert len(returned[rank]) == len(written[rank]["predictions"]) == 3
        for got, want in zip(returned[rank], written[rank]["predictions"], strict=True):
            assert got.keys() == want.keys() == {"mean", "std", "entropy", "mutual_information"}
            for key in got:
                assert torch.equal(got[key], want[key])

    # gathered by index, the shards equal a single-process BMA with the same posterior and seed
    gathered = {}
    for rank in (0, 1):
        rows = torch.cat([p["mean"] for p in written[rank]["predictions"]])
        gathered.update(zip(indices[rank], rows, strict=True))
    ddp_mean = torch.stack([gathered[i] for i in range(40)])

    model = script.TinyClassifier()
    model.load_state_dict(_load(ddp_run / "fit_rank0.pt")["state_dict"])
    posterior = SWAGPosterior.load(ddp_run / "posterior_rank0.pt")
    bma = SWAGModule(
        model, posterior, num_samples=script.NUM_SAMPLES, task="classification", seed=script.SEED
    )
    single = L.Trainer(**QUIET).predict(bma, script.predict_loader())
    single_mean = torch.cat([p["mean"] for p in single])
    torch.testing.assert_close(ddp_mean, single_mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- sharded strategies


@pytest.mark.slow
def test_ddp_predict_without_seed_uses_the_same_samples_on_every_rank(ddp_run: Path) -> None:
    seeds = [torch.load(ddp_run / f"unseeded_rank{r}.pt")["run_seed"] for r in (0, 1)]
    assert seeds[0] is not None and seeds[0] == seeds[1]


class MyFSDP(FSDPStrategy):
    """A user subclass: must be refused too (the check walks the MRO, not just the class name)."""


DeepSpeedLookalike = type("DeepSpeedStrategy", (), {})  # DeepSpeed itself is not installed


@pytest.mark.parametrize(
    "strategy, shown",
    [
        (FSDPStrategy(), "FSDPStrategy"),
        (MyFSDP(), "MyFSDP (a FSDPStrategy)"),
        (DeepSpeedLookalike(), "DeepSpeedStrategy"),
    ],
    ids=["fsdp", "fsdp-subclass", "deepspeed"],
)
def test_unsupported_sharded_strategies_are_refused_with_a_clear_error(strategy, shown) -> None:
    # Lightning refuses FSDP on CPU before any callback runs, so the trainer is a stand-in that
    # carries the strategy object; SWAGCallback.setup only looks at trainer.strategy.
    trainer = SimpleNamespace(strategy=strategy)
    swag = SWAGCallback()
    with pytest.raises(RuntimeError, match="sharded strategy") as err:
        swag.setup(trainer, TinyRegressor(), "fit")  # type: ignore[arg-type]
    message = str(err.value)
    assert shown in message
    # and it says what works instead: FSDP2 under ModelParallelStrategy, or DDP with sharded statistics
    assert "ModelParallelStrategy" in message and "fully_shard" in message
    assert "strategy='ddp'" in message and "shard=True" in message


def test_sharded_check_only_concerns_fit_and_lets_ddp_and_model_parallel_through() -> None:
    swag = SWAGCallback()
    swag.setup(SimpleNamespace(strategy=FSDPStrategy()), TinyRegressor(), "predict")  # type: ignore[arg-type]
    swag.setup(SimpleNamespace(strategy=DDPStrategy(), checkpoint_callbacks=[]), TinyRegressor(), "fit")  # type: ignore[arg-type]
    swag.setup(
        SimpleNamespace(strategy=ModelParallelStrategy(), checkpoint_callbacks=[]), TinyRegressor(), "fit"
    )  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strategy="ddp" (subprocess launcher): no warning either
        swag.setup(
            L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False), TinyRegressor(), "fit"
        )


def test_spawn_based_strategies_warn_that_the_posterior_stays_in_the_workers() -> None:
    # building the Trainer launches nothing; SWAGCallback.setup would run in the spawned workers
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    assert isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)
    with pytest.warns(UserWarning, match="posterior` will not be available in the launching process"):
        SWAGCallback().setup(trainer, TinyRegressor(), "fit")
    # and the main process's error says where the posterior went
    with pytest.raises(RuntimeError, match="ddp_spawn"):
        _ = SWAGCallback().posterior


# ---------------------------------------------------------------------- MNIST predictions under DDP

MNIST_SCRIPT = Path(__file__).with_name("ddp_predict_mnist_script.py")


@pytest.mark.slow
def test_ddp_predictions_of_the_mnist_datamodule_merge_to_each_test_row_once(mnist_root, tmp_path) -> None:
    """Each rank predicts its own share of MNISTDataModule's test set; merged, every row appears once,
    in dataset order, equal to a single-process BMA with the same seed."""
    import ddp_predict_mnist_script as mnist_script

    from lightning_swag.experiments.models import MNISTClassifier
    from lightning_swag.lightning.writer import merge_predictions

    torch.manual_seed(0)
    model = MNISTClassifier()
    posterior = SWAGPosterior.from_model(model, max_rank=3)
    g = torch.Generator().manual_seed(1)
    walker = MNISTClassifier()
    walker.load_state_dict(model.state_dict())
    for _ in range(4):
        with torch.no_grad():
            for p in walker.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        posterior.collect(walker)
    saved = tmp_path / "saved.pt"
    torch.save({"model": model.state_dict(), "posterior": posterior.state_dict()}, saved)

    out = tmp_path / "predictions"
    run_two_process_script(
        [str(MNIST_SCRIPT), str(mnist_root), str(saved), str(out)], "DDP predict", timeout=240
    )
    files = sorted(out.glob("predictions_rank*.pt"))
    assert [f.name for f in files] == ["predictions_rank0.pt", "predictions_rank1.pt"]
    merged = merge_predictions(files)

    dm = mnist_script.datamodule(str(mnist_root))
    dm.setup("test")
    images, labels = dm.test_tensors()
    n = len(labels)
    assert n == min(mnist_script.TEST_SUBSET, len(labels))
    assert merged["meta"]["num_rows"] == n
    assert torch.equal(merged["indices"], torch.arange(n))
    assert torch.equal(merged["targets"], labels)

    bma = SWAGModule(
        model, posterior, num_samples=mnist_script.NUM_SAMPLES, task="classification", seed=mnist_script.SEED
    )
    single = L.Trainer(**QUIET).predict(bma, dm.test_dataloader())
    torch.testing.assert_close(merged["mean"], torch.cat([b["mean"] for b in single]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- exact test metrics under DDP

TEST_SCRIPT = Path(__file__).with_name("ddp_test_script.py")


@pytest.mark.slow
def test_the_guides_recipe_gives_ddp_test_metrics_of_every_row_once(tmp_path) -> None:
    """37 rows on 2 processes: Lightning's default sampler scores a repeated row; the distributed guide's
    recipe (no distributed sampler, an UnrepeatedDistributedSampler) gives the one-process metrics."""
    import ddp_test_script as test_script

    run_two_process_script([str(TEST_SCRIPT), str(tmp_path)], "DDP test", timeout=240)
    metrics = _load(tmp_path / "metrics.pt")
    single = L.Trainer(**QUIET).test(
        test_script.swag_module(), DataLoader(test_script.test_set(), batch_size=test_script.BATCH_SIZE)
    )[0]
    assert set(metrics["exact"]) == set(single) and "test_nll" in single
    for key, value in single.items():
        assert metrics["exact"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert metrics["default"]["test_nll"] != pytest.approx(single["test_nll"], rel=1e-5)  # the repeated row
    # the linearised predictive's mc draws are the weight samples of the seed: the same under DDP
    linearized = L.Trainer(**QUIET).test(
        test_script.swag_module(**test_script.LINEARIZED_MC),
        DataLoader(test_script.test_set(), batch_size=test_script.BATCH_SIZE),
    )[0]
    for key, value in linearized.items():
        assert metrics["linearized_mc"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    guide = (Path(__file__).parents[1] / "docs" / "guide" / "distributed.md").read_text()
    assert "use_distributed_sampler=False" in guide and "UnrepeatedDistributedSampler" in guide
