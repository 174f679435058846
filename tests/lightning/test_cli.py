"""The ``lightning-swag`` CLI end to end (fit -> predict/test from the checkpoint) and the prediction writer.

The CLI runs in-process through :func:`lightning_swag.lightning.cli.cli_main`, with the example configs and
reduced epochs. MNIST data come from ``LIGHTNING_SWAG_DATA`` (torchvision layout) when it is set,
else from small synthetic IDX files written to a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from conftest import QUIET, TinyRegressor, tiny_loader

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior
from lightning_swag.experiments.data import SineDataModule
from lightning_swag.experiments.models import MNISTClassifier, SineRegressor
from lightning_swag.lightning.cli import cli_main, infer_task
from lightning_swag.lightning.writer import SWAGPredictionWriter, load_predictions, merge_predictions

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
SINE_YAML = str(CONFIGS / "sine.yaml")
MNIST_YAML = str(CONFIGS / "mnist.yaml")
QUIET_FIT = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

pytestmark = [  # third-party noise: TensorBatchLoader is not a DataLoader; torch pytree deprecation
    pytest.mark.filterwarnings("ignore:.*Couldn't infer the batch indices.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*"),
]


@pytest.fixture(scope="module", autouse=True)
def _cli_argv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """In-process runs parse ``args``, never pytest's own command line, and the configs' relative
    paths (``runs/...``) land in a temporary folder, never in the checkout."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning-swag"])
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


# ---------------------------------------------------------------------------------------------- sine
@pytest.fixture(scope="module")
def sine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fit`` with the sine config, 20 pretraining + 20 collection epochs; returns the root folder."""
    root = tmp_path_factory.mktemp("sine_cli")
    cli = cli_main(
        [
            "fit",
            "--config",
            SINE_YAML,
            "--trainer.max_epochs=40",
            "--trainer.callbacks.start_epoch=20",
            "--trainer.callbacks.every_n_epochs=2",
            "--trainer.default_root_dir",
            str(root),
            *QUIET_FIT,
        ]
    )
    swag = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SWAGCallback))
    assert swag.posterior.num_snapshots == 10
    assert swag.max_rank == 25 and swag.swa_lr == 0.01  # the rest comes from the YAML file
    return root


@pytest.mark.slow
def test_sine_fit_then_predict_writes_bma_predictions(
    sine_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = sine_run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (sine_run / "config.yaml").is_file()
    out_dir = tmp_path / "preds"
    cli = cli_main(
        [
            "predict",
            "--config",
            SINE_YAML,
            "--ckpt_path",
            str(ckpt),
            "--trainer.default_root_dir",
            str(sine_run),
            "--predictions.output_dir",
            str(out_dir),
            "--swag.num_samples=100",
        ]
    )
    assert isinstance(cli.model, SWAGModule) and isinstance(cli.model.model, SineRegressor)
    assert cli.model.posterior.num_snapshots == 10  # restored from the checkpoint
    assert not cli.trainer.predict_loop.return_predictions  # written to a file, not also kept in memory
    # The default progress bar stays on and shows predict progress over batches.
    assert cli.trainer.progress_bar_callback is not None
    captured = capsys.readouterr()
    assert (
        "Predicting" in captured.out + captured.err
    )  # TQDM says "Predicting DataLoader 0", Rich "Predicting"

    preds = torch.load(out_dir / "predictions.pt", weights_only=True)
    assert set(preds) == {"mean", "std", "x", "targets", "indices", "meta"}
    x, std = preds["x"].squeeze(1), preds["std"].squeeze(1)
    assert preds["mean"].shape == preds["std"].shape == preds["targets"].shape == (500, 1)
    assert torch.allclose(x, torch.linspace(-10, 10, 500))
    assert torch.allclose(preds["targets"], 3 * torch.sin(preds["x"]))
    assert torch.equal(preds["indices"], torch.arange(500))
    assert preds["meta"]["task"] == "regression" and preds["meta"]["total_samples"] == 100
    inside, outside = std[x.abs() <= 5].mean(), std[x.abs() > 5].mean()
    assert outside > inside > 0, (inside, outside)


@pytest.mark.slow
def test_sine_predict_last_npz_default_folder_is_reproducible(sine_run: Path, tmp_path: Path) -> None:
    """``--ckpt_path last`` finds the newest last.ckpt, the default folder is <root>/predictions, the
    .npz file holds the same numbers as a .pt run with the same seed."""
    common = ["--config", SINE_YAML, "--trainer.default_root_dir", str(sine_run), "--swag.num_samples=20"]
    common += ["--trainer.enable_progress_bar=false"]
    cli_main(
        [
            "predict",
            *common,
            "--ckpt_path",
            "last",
            "--predictions.output_dir=null",
            "--predictions.filename=p.npz",
        ]
    )
    cli_main(["predict", *common, "--ckpt_path", "last", "--predictions.output_dir", str(tmp_path)])
    npz = load_predictions(sine_run / "predictions" / "p.npz")
    pt = load_predictions(tmp_path / "predictions.pt")
    assert npz["meta"] == pt["meta"]
    for key in ("mean", "std", "x", "targets"):
        assert torch.equal(npz[key], pt[key]), key


@pytest.mark.slow
def test_sine_test_subcommand_reports_uncertainty_metrics(sine_run: Path) -> None:
    cli = cli_main(
        [
            "test",
            "--config",
            SINE_YAML,
            "--ckpt_path",
            str(sine_run / "checkpoints" / "last.ckpt"),
            "--trainer.default_root_dir",
            str(sine_run),
            "--swag.num_samples=20",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.model, SWAGModule) and cli.model.task == "regression"
    metrics = cli.trainer.callback_metrics
    assert {"test_rmse", "test_mean_std"} <= set(metrics), metrics
    # RMSE of the BMA mean against 3 sin x on the training range; predicting 0 would give about 2.1
    assert 0 < metrics["test_rmse"] < 2.0 and metrics["test_mean_std"] > 0


@pytest.mark.filterwarnings("ignore:.*the checkpoint's posterior has max_rank=2.*")  # the YAML says 25
def test_predict_from_a_checkpoint_saved_in_python(tmp_path: Path) -> None:
    """A checkpoint of a plain ``trainer.fit`` (no CLI, so no class path in its hyperparameters)
    works too; its hyperparameters (hidden=12) override the config's (hidden=10)."""
    trainer = L.Trainer(max_epochs=3, callbacks=[SWAGCallback(start_epoch=1, max_rank=2)], **QUIET)
    trainer.fit(SineRegressor(hidden=12), datamodule=SineDataModule(num_points=64))
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    cli = cli_main(
        [
            "predict",
            "--config",
            SINE_YAML,
            "--ckpt_path",
            str(tmp_path / "python.ckpt"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--swag.num_samples=5",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.model.model.hparams.hidden == 12 and cli.model.posterior.num_snapshots == 2
    assert load_predictions(tmp_path / "predictions" / "predictions.pt")["std"].shape == (500, 1)


@pytest.mark.slow
def test_callback_model_and_data_selected_on_the_command_line(tmp_path: Path) -> None:
    cli = cli_main(
        [
            "fit",
            "--model",
            "lightning_swag.experiments.models.SineRegressor",
            "--model.hidden=8",
            "--data",
            "lightning_swag.experiments.data.SineDataModule",
            "--data.num_points=64",
            "--trainer.callbacks+=SWAGCallback",
            "--trainer.callbacks.start_epoch=1",
            "--trainer.callbacks.max_rank=3",
            "--trainer.max_epochs=3",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.default_root_dir",
            str(tmp_path),
            *QUIET_FIT,
        ]
    )
    assert isinstance(cli.model, SineRegressor) and cli.model.hparams.hidden == 8
    swag = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SWAGCallback))
    assert (swag.start_epoch, swag.max_rank, swag.posterior.num_snapshots) == (1, 3, 2)


# --------------------------------------------------------------------------------------------- MNIST
@pytest.fixture(scope="module")
def mnist_run(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """``fit`` with the MNIST config on a small subset, 2 + 2 epochs; returns (root, shared options)."""
    root = tmp_path_factory.mktemp("mnist_cli")
    data = ["--data.data_dir", str(mnist_root), "--data.download=false", "--data.val_size=200"]
    data += ["--data.subset=1200", "--data.test_subset=300", "--trainer.default_root_dir", str(root)]
    cli_main(
        [
            "fit",
            "--config",
            MNIST_YAML,
            *data,
            "--trainer.max_epochs=4",
            "--trainer.callbacks.start_epoch=2",
            *QUIET_FIT,
        ]
    )
    return root, data


@pytest.mark.slow
def test_mnist_fit_then_predict_writes_classification_uncertainty(
    mnist_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, data = mnist_run
    cli = cli_main(
        [
            "predict",
            "--config",
            MNIST_YAML,
            *data,
            "--ckpt_path",
            str(root / "checkpoints" / "last.ckpt"),
            "--predictions.output_dir",
            str(tmp_path),
            "--swag.num_samples=10",
            "--swag.task=null",  # inferred from the model
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.model.model, MNISTClassifier) and cli.model.task == "classification"
    preds = torch.load(tmp_path / "predictions.pt", weights_only=True)
    n = 300
    assert set(preds) == {"mean", "std", "entropy", "mutual_information", "targets", "indices", "meta"}
    assert torch.equal(preds["indices"], torch.arange(len(preds["mean"])))  # MNIST loaders report indices
    assert preds["mean"].shape == preds["std"].shape == (n, 10)
    assert preds["entropy"].shape == preds["mutual_information"].shape == preds["targets"].shape == (n,)
    assert torch.allclose(preds["mean"].sum(1), torch.ones(n), atol=1e-5)
    assert (preds["entropy"] >= 0).all() and (preds["mutual_information"] >= 0).all()
    assert (preds["mutual_information"] <= preds["entropy"] + 1e-6).all()
    assert preds["targets"].dtype == torch.int64
    accuracy = (preds["mean"].argmax(1) == preds["targets"]).float().mean()
    assert accuracy > 0.6, accuracy
    assert preds["meta"]["task"] == "classification" and preds["meta"]["total_samples"] == 10


@pytest.mark.slow
def test_mnist_predict_with_ood_set_is_more_uncertain_out_of_distribution(
    mnist_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """With ``--data.predict_ood=true`` one predict run writes MNIST test (dataloader 0) and
    Fashion-MNIST (dataloader 1); the BMA's predictive entropy is higher on the latter. (After only
    2 + 2 epochs on 1,200 images the epistemic parts, std and mutual information, are too small to
    separate reliably; on 12,000 images and 4 epochs they do, see the README.)"""
    root, data = mnist_run
    cli_main(
        [
            "predict",
            "--config",
            MNIST_YAML,
            *data,
            "--data.predict_ood=true",
            "--ckpt_path",
            str(root / "checkpoints" / "last.ckpt"),
            "--predictions.output_dir",
            str(tmp_path),
            "--swag.num_samples=10",
            "--trainer.enable_progress_bar=false",
        ]
    )
    inside = torch.load(tmp_path / "predictions_dataloader0.pt", weights_only=True)
    outside = torch.load(tmp_path / "predictions_dataloader1.pt", weights_only=True)
    assert inside["mean"].shape == outside["mean"].shape == (300, 10)
    assert outside["entropy"].mean() > inside["entropy"].mean()


@pytest.mark.slow
def test_mnist_test_subcommand_reports_uncertainty_metrics(mnist_run: tuple[Path, list[str]]) -> None:
    root, data = mnist_run
    cli = cli_main(
        [
            "test",
            "--config",
            MNIST_YAML,
            *data,
            "--ckpt_path",
            str(root / "checkpoints" / "last.ckpt"),
            "--swag.num_samples=10",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.model, SWAGModule) and cli.model.task == "classification"
    metrics = cli.trainer.callback_metrics
    expected = {
        "test_accuracy",
        "test_nll",
        "test_brier",
        "test_ece",
        "test_entropy",
        "test_mutual_information",
    }
    assert expected <= set(metrics), metrics
    assert metrics["test_accuracy"] > 0.6 and metrics["test_nll"] > 0 and 0 <= metrics["test_ece"] <= 1


# ---------------------------------------------------------------------------------- errors and help
def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_mistyped_option_is_a_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_error(["fit", "--config", SINE_YAML, "--trainer.max_epoch=3"], capsys)
    assert "error: unrecognized arguments: --trainer.max_epoch=3" in err


@pytest.mark.parametrize(
    ("value", "message"),
    [("abc", 'Parser key "max_rank":\n'), ("-1", "SWAGCallback: max_rank must be an int >= 0, got -1.")],
)
def test_invalid_callback_argument_in_yaml_is_a_cli_error(
    value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_swag.SWAGCallback\n"
        f"      init_args:\n        start_epoch: 1\n        max_rank: {value}\n"
    )
    err = _cli_error(["fit", "--config", SINE_YAML, "--config", str(bad)], capsys)
    assert "error:" in err and message in err and value in err


def test_a_bad_value_gives_the_packages_message_first_and_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """The parser's account of a value SWAGCallback refuses (every type of a Union, the usage) is
    left out: the package's own message is the error."""
    err = _cli_error(["fit", "--config", SINE_YAML, "--trainer.callbacks.max_rank=-1"], capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert lines == [
        "lightning-swag fit: error: SWAGCallback: max_rank must be an int >= 0, got -1. (set "
        "JSONARGPARSE_DEBUG=1 for the parser's details and a traceback)"
    ]


def test_help_says_what_the_tool_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in out
    assert "SWAG (Stochastic Weight Averaging Gaussian) uncertainty for a LightningModule" in out
    assert "Bayesian model averaging" in out and "--ckpt_path" in out


def test_predict_needs_a_checkpoint_with_a_posterior(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(["predict", "--config", SINE_YAML], capsys)
    assert "needs --ckpt_path" in err
    err = _cli_error(["predict", "--config", SINE_YAML, "--ckpt_path", str(tmp_path / "nope.ckpt")], capsys)
    assert "no such file" in err
    # One epoch of fit, long before SWAGCallback's start_epoch: the checkpoint has no snapshot yet.
    root = ["--trainer.default_root_dir", str(tmp_path)]
    cli_main(
        ["fit", "--config", SINE_YAML, "--trainer.max_epochs=1", "--data.num_points=32", *root, *QUIET_FIT]
    )
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    err = _cli_error(["predict", "--config", SINE_YAML, "--ckpt_path", ckpt, *root], capsys)
    assert "holds no SWAG posterior with snapshots" in err and "start_epoch" in err
    data = Path(ckpt).read_bytes()
    for name, content in {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00junk" * 40,
    }.items():
        bad = tmp_path / f"{name}.ckpt"
        bad.write_bytes(content)
        err = _cli_error(["predict", "--config", SINE_YAML, "--ckpt_path", str(bad), *root], capsys)
        assert f"{name}.ckpt" in err and "not a readable checkpoint" in err, err


def test_predict_help_lists_the_swag_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["predict", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--swag.num_samples", "--swag.scale", "--swag.task", "--swag.covariance", "--ckpt_path"):
        assert option in out


def test_console_script_help() -> None:
    script = shutil.which("lightning-swag", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "lightning_swag.lightning.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: lightning-swag" in result.stdout
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def test_infer_task() -> None:
    assert infer_task(MNISTClassifier()) == "classification"
    assert infer_task(SineRegressor()) == "regression"
    assert infer_task(TinyRegressor()) == "regression"


# ---------------------------------------------------------------------------------------- the writer
def _swag_module(seed: int = 0) -> SWAGModule:
    torch.manual_seed(seed)
    model = TinyRegressor()
    posterior = SWAGPosterior.from_model(model, max_rank=3)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        posterior.collect(model)
    return SWAGModule(model, posterior, num_samples=6, seed=1, return_samples=True)


@pytest.mark.parametrize("filename", ["predictions.pt", "predictions.npz"])
def test_writer_epoch_file_concatenates_batches(tmp_path: Path, filename: str) -> None:
    module, loader = _swag_module(), tiny_loader(n=40, batch_size=16)
    writer = SWAGPredictionWriter(str(tmp_path), filename=filename)
    L.Trainer(callbacks=[writer], **QUIET).predict(module, dataloaders=loader, return_predictions=False)
    assert writer.written == [tmp_path / filename]
    preds = load_predictions(tmp_path / filename)
    x, y = loader.dataset.tensors
    module.reset_samples()
    expected = module(x)
    assert torch.allclose(preds["mean"], expected["mean"], atol=1e-6)
    assert torch.allclose(preds["std"], expected["std"], atol=1e-6)
    assert preds["samples"].shape == (6, 40, 1)  # sample-major: batches joined along dim 1
    assert torch.equal(preds["targets"], y) and torch.equal(preds["x"], x)
    assert torch.equal(preds["indices"], torch.arange(40))
    assert preds["meta"]["num_rows"] == 40 and preds["meta"]["seed"] == 1


def test_writer_batch_interval_writes_one_file_per_batch(tmp_path: Path) -> None:
    writer = SWAGPredictionWriter(str(tmp_path), write_interval="batch", save_inputs=False)
    L.Trainer(callbacks=[writer], **QUIET).predict(
        _swag_module(), dataloaders=tiny_loader(n=40, batch_size=16), return_predictions=False
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"predictions_batch{i:06d}.pt" for i in range(3)]
    last = load_predictions(tmp_path / names[-1])
    assert (
        last["mean"].shape == (8, 1)
        and "x" not in last
        and torch.equal(last["indices"], torch.arange(32, 40))
    )


def test_writer_file_names_per_rank_and_dataloader() -> None:
    writer = SWAGPredictionWriter("out")
    ddp = SimpleNamespace(num_predict_batches=[3], world_size=4, global_rank=2)
    assert writer._path(ddp, 0, None) == Path("out/predictions_rank2.pt")
    two_loaders = SimpleNamespace(num_predict_batches=[3, 5], world_size=1, global_rank=0)
    assert writer._path(two_loaders, 1, 7) == Path("out/predictions_dataloader1_batch000007.pt")


def test_merge_predictions_restores_dataset_order_and_drops_ddp_padding(tmp_path: Path) -> None:
    # DistributedSampler(shuffle=False) over 5 rows and 2 ranks: rank 0 gets 0, 2, 4 and rank 1 gets
    # 1, 3 and, as padding, 0 again.
    values = torch.arange(5.0).unsqueeze(1) * 10
    for rank, idx in enumerate([[0, 2, 4], [1, 3, 0]]):
        part = {"mean": values[idx], "samples": values[idx].expand(3, 3, 1), "indices": torch.tensor(idx)}
        torch.save({**part, "meta": {"global_rank": rank, "num_rows": 3}}, tmp_path / f"p_rank{rank}.pt")
    merged = merge_predictions(sorted(tmp_path.glob("p_rank*.pt")))
    assert torch.equal(merged["indices"], torch.arange(5)) and torch.equal(merged["mean"], values)
    assert torch.equal(merged["samples"], values.expand(3, 5, 1))
    assert merged["meta"] == {"global_rank": 0, "num_rows": 5}


def test_writer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\.pt or \.npz"):
        SWAGPredictionWriter("out", filename="predictions.csv")
    with pytest.raises(ValueError, match="write_interval"):
        SWAGPredictionWriter("out", write_interval="batch_and_epoch")  # type: ignore[arg-type]


def test_swag_options_are_swagmodules_signature(capsys: pytest.CaptureFixture[str]) -> None:
    """Every SWAGModule argument that is an option (not an object) is a --swag.* option with SWAGModule's
    default, and every SWAGPredictionWriter argument a --predictions.* option."""
    import inspect

    from lightning_swag.lightning.cli import _NOT_OPTIONS

    with pytest.raises(SystemExit):
        cli_main(["predict", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    signature = inspect.signature(SWAGModule.__init__).parameters
    expected = {n: p.default for n, p in signature.items() if n != "self" and n not in _NOT_OPTIONS}
    assert config["swag"] == expected
    writer = inspect.signature(SWAGPredictionWriter.__init__).parameters
    assert config["predictions"] == {n: p.default for n, p in writer.items() if n != "self"}


def test_the_private_lightning_apis_we_rely_on_still_exist() -> None:
    """lightning-swag uses two private pieces of Lightning; this fails loudly when either changes."""
    import inspect

    from lightning.pytorch.cli import LightningCLI

    # 1. SWAGLightningCLI overrides LightningCLI._parse_ckpt_path, which __init__ calls after parsing.
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)
    # 2. SWAGCallback recognises spawn-based launchers by the class name _MultiProcessingLauncher.
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    assert type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"


def test_summarize_predictions_reports_what_the_readme_quotes(tmp_path: Path) -> None:
    """``examples/summarize_predictions.py`` against the same numbers computed here."""
    x = torch.linspace(-10, 10, 8).unsqueeze(1)
    std = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.5, 1.5, 2.0, 4.0]).unsqueeze(1)
    torch.save({"x": x, "mean": torch.zeros(8, 1), "std": std, "meta": {}}, tmp_path / "reg.pt")
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.9, 0.05, 0.05]])
    spread = torch.tensor([[0.1, 0.0, 0.1], [0.0, 0.2, 0.0], [0.1, 0.1, 0.1], [0.0, 0.0, 0.1]])
    labels = torch.tensor([0, 2, 0, 0])
    torch.save({"mean": probs, "std": spread, "targets": labels, "meta": {}}, tmp_path / "cls.pt")
    script = Path(__file__).resolve().parents[2] / "examples" / "summarize_predictions.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "reg.pt"), str(tmp_path / "cls.pt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    inside = x.squeeze(1).abs() <= 5
    want_in, want_out = std.squeeze(1)[inside].mean(), std.squeeze(1)[~inside].mean()
    assert f"mean std {want_in:.2f} on |x| <= 5, {want_out:.2f} on |x| > 5" in out
    entropy = -(probs * probs.log()).sum(-1).mean()
    accuracy = (probs.argmax(-1) == labels).float().mean()
    assert (
        f"mean summed std {spread.sum(-1).mean():.3f}, mean entropy {entropy:.2f}, accuracy {accuracy:.1%}"
        in out
    )


@pytest.mark.slow
def test_the_documented_loop_twice_into_one_folder_predicts_from_the_second_fit(tmp_path: Path) -> None:
    """docs/guide/cli.md's commands, with different options the second time, into one folder (the
    config's ``runs/sine``): the documented ``--ckpt_path .../last.ckpt`` is the second fit's."""
    fits, folder = [], Path("runs/sine/checkpoints")
    for epochs, start in ((6, 3), (9, 5)):
        cli = cli_main(
            ["fit", "--config", SINE_YAML, f"--trainer.max_epochs={epochs}"]
            + [f"--trainer.callbacks.start_epoch={start}", *QUIET_FIT]
        )
        fits.append(next(cb for cb in cli.trainer.callbacks if isinstance(cb, SWAGCallback)).posterior)
        assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no last-v1.ckpt beside it
        assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == epochs
    cli = cli_main(
        ["predict", "--config", SINE_YAML, "--ckpt_path", str(folder / "last.ckpt"), "--swag.num_samples=4"]
        + ["--trainer.enable_progress_bar=false"]
    )
    used = cli.model.engine.posteriors[0]
    assert used.num_snapshots == fits[1].num_snapshots == 4 != fits[0].num_snapshots
    torch.testing.assert_close(used.mean, fits[1].mean)


@pytest.mark.parametrize("verbose", [False, True])
def test_the_cli_runs_quiet_unless_asked(
    verbose: bool,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No accelerator or tips banners, no seed line and no model summary; all back with
    LIGHTNING_SWAG_VERBOSE=1."""
    if verbose:
        monkeypatch.setenv("LIGHTNING_SWAG_VERBOSE", "1")
    else:
        monkeypatch.delenv("LIGHTNING_SWAG_VERBOSE", raising=False)
    with caplog.at_level("DEBUG"):
        cli_main(
            ["fit", "--config", SINE_YAML, "--trainer.max_epochs=2", "--trainer.callbacks.start_epoch=1"]
            + ["--trainer.enable_progress_bar=false", "--trainer.default_root_dir", str(tmp_path)]
        )
    captured = capfd.readouterr()
    out = captured.out + captured.err + caplog.text
    for noise in ("GPU available", "TPU available", "Tip:", "Seed set to", "Trainable params"):
        assert (noise in out) == verbose, noise
