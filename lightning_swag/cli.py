"""The ``lightning-swag`` command line: Lightning's ``LightningCLI`` with SWAG for test and predict.

``fit`` and ``validate`` run the configured model as is; put ``SWAGCallback`` in
``trainer.callbacks`` to collect the posterior during ``fit`` (it is saved in every checkpoint).
``test`` and ``predict`` wrap the model into :class:`~lightning_swag.SWAGModule`, restore the weights
*and* the SWAG posterior from ``--ckpt_path`` and run Bayesian model averaging; ``predict`` writes
the result with :class:`~lightning_swag.writer.SWAGPredictionWriter`::

    lightning-swag fit --config examples/configs/sine.yaml
    lightning-swag predict --config examples/configs/sine.yaml --ckpt_path runs/sine/checkpoints/last.ckpt

The ``swag`` options (``--swag.num_samples``, ``--swag.scale``, ...) are accepted by every subcommand,
so one config file serves them all, but only ``test`` and ``predict`` use them.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

# Imported so that jsonargparse resolves the short name ``--trainer.callbacks+=SWAGCallback``. Models
# and DataModules are named by class path (``--model lightning_swag.experiments.models.SineRegressor``).
from lightning_swag.callback import SWAGCallback  # noqa: F401
from lightning_swag.module import SWAGModule
from lightning_swag.writer import SWAGPredictionWriter

__all__ = ["SWAGLightningCLI", "cli_main", "infer_task", "main"]

_CKPT_KEYWORDS = ("last", "best", "hpc")


class SaveFitConfigCallback(SaveConfigCallback):
    """Save the resolved config to the log folder for ``fit`` runs only (overwriting it).

    ``test``/``predict`` runs usually share ``fit``'s folder and must not clobber its ``config.yaml``.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def infer_task(model: torch.nn.Module) -> Literal["regression", "classification"]:
    """The BMA task of ``model`` when ``--swag.task`` is not given: its ``task`` attribute if set,
    ``"classification"`` for a model with a ``num_classes`` hyperparameter, else ``"regression"``."""
    task = getattr(model, "task", None)
    if task in ("regression", "classification"):
        return task
    hparams = getattr(model, "hparams", {})
    return "classification" if "num_classes" in hparams else "regression"


class SWAGLightningCLI(LightningCLI):
    """``LightningCLI`` whose ``test``/``predict`` run Bayesian model averaging with SWAG.

    Any LightningModule / LightningDataModule can be selected (``--model SineRegressor``,
    ``class_path: lightning_swag.experiments.models.MNISTClassifier``). For ``test`` and ``predict`` the model is
    wrapped into ``SWAGModule(model, posterior=None, **swag_options)``; the checkpoint given with
    ``--ckpt_path`` (one written by ``fit`` with ``SWAGCallback``) restores both the weights and the
    posterior. ``predict`` writes its output with a :class:`SWAGPredictionWriter` to
    ``--swag.output_dir`` (default ``<trainer.default_root_dir>/predictions``) unless a prediction
    writer is already in ``trainer.callbacks``; predictions are not also kept in memory unless
    ``--return_predictions true`` is given.

    Arguments are those of :class:`~lightning.pytorch.cli.LightningCLI`; ``model_class`` defaults
    to any LightningModule and ``datamodule_class`` to any (optional) LightningDataModule.
    """

    def __init__(
        self,
        model_class: type[LightningModule] | None = LightningModule,
        datamodule_class: type[LightningDataModule] | None = None,
        save_config_callback: type[SaveConfigCallback] | None = SaveFitConfigCallback,
        save_config_kwargs: dict[str, Any] | None = None,
        parser_kwargs: dict[str, Any] | None = None,
        subclass_mode_model: bool = True,
        subclass_mode_data: bool = True,
        **kwargs: Any,
    ) -> None:
        parser_kwargs = {"prog": "lightning-swag", **(parser_kwargs or {})}
        super().__init__(
            model_class=model_class,
            datamodule_class=datamodule_class,
            save_config_callback=save_config_callback,
            save_config_kwargs={"overwrite": True, **(save_config_kwargs or {})},
            parser_kwargs=parser_kwargs,
            subclass_mode_model=subclass_mode_model,
            subclass_mode_data=subclass_mode_data,
            **kwargs,
        )

    # ------------------------------------------------------------------ parser
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parsers that reject abbreviated options: ``--trainer.max_epoch`` is an error, not ``max_epochs``."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``swag`` group: the options of :class:`SWAGModule` and of the prediction files."""
        group = parser.add_argument_group(
            "SWAG", "Bayesian model averaging options, used by test and predict (ignored by fit/validate)."
        )
        swag_args: list[tuple[str, Any, Any, str]] = [
            ("num_samples", PositiveInt, 30, "Weight samples drawn from the posterior."),
            (
                "scale",
                NonNegativeFloat,
                0.5,
                "Covariance scale (0.5 as in the paper; 0 with 1 sample = SWA).",
            ),
            (
                "task",
                Literal["regression", "classification"] | None,
                None,
                "Summary to compute; default: classification for MNISTClassifier / models with "
                "num_classes, else regression.",
            ),
            ("covariance", Literal["low_rank", "diagonal"], "low_rank", "Full SWAG or SWAG-Diagonal."),
            ("seed", int | None, None, "Seed of the weight samples (reproducible predictions)."),
            ("chunk_size", PositiveInt | None, None, "Samples per vectorised forward pass (memory)."),
            ("return_samples", bool, False, "Also write the per-sample outputs 'samples' [S, N, ...]."),
            (
                "output_dir",
                str | None,
                None,
                "predict: folder of the predictions file (default <trainer.default_root_dir>/predictions); "
                "ignored when trainer.callbacks holds a prediction writer.",
            ),
            ("filename", str, "predictions.pt", "predict: name of the predictions file (.pt or .npz)."),
        ]
        for name, type_, default, help_ in swag_args:
            group.add_argument(f"--swag.{name}", type=type_, default=default, help=help_)

    # ------------------------------------------------------------------ instantiation
    def instantiate_classes(self) -> None:
        """Instantiate as usual; report argument errors raised by constructors as CLI errors."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            self._parser(self.subcommand).error(
                f"Invalid configuration ({type(err).__name__}): {err} (set JSONARGPARSE_DEBUG=1 for a traceback)",
                ex=err,
            )

    def _parse_ckpt_path(self) -> None:
        """Apply the checkpoint's model hyperparameters to the config, as ``LightningCLI`` does, also for
        checkpoints written outside the CLI (``trainer.save_checkpoint`` in a script or notebook): their
        hyperparameters carry no class path, so they go to the configured model class."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not readable as weights: leave it to LightningCLI
            return super()._parse_ckpt_path()
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        model = self.config[subcommand].get("model")
        class_path = model.get("class_path") if model is not None else None
        if not hparams or "_class_path" in hparams or not class_path:
            return super()._parse_ckpt_path()
        update = {subcommand: {"model": {"class_path": class_path, "init_args": hparams}}}
        self.config = self.parser.parse_object(update, self.config)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the writer has them; don't also hold them in memory
        return kwargs

    # ------------------------------------------------------------------ subcommand hooks
    def before_test(self) -> None:
        """Wrap the model into ``SWAGModule`` (weights and posterior come from ``--ckpt_path``)."""
        self._wrap_model("test")

    def before_predict(self) -> None:
        """Wrap the model into ``SWAGModule`` and make sure the predictions are written to a file."""
        self._wrap_model("predict")
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            swag = self.config_init["predict"]["swag"]
            output_dir = swag.output_dir or os.path.join(self.trainer.default_root_dir, "predictions")
            try:
                writer = SWAGPredictionWriter(output_dir=output_dir, filename=swag.filename)
            except ValueError as err:
                self._parser("predict").error(f"--swag.filename: {err}", ex=err)
            self.trainer.callbacks.append(writer)

    def _wrap_model(self, subcommand: str) -> None:
        self._check_checkpoint(subcommand)
        swag = self.config_init[subcommand]["swag"]
        model = self.model
        task = swag.task or infer_task(model)
        self.model = SWAGModule(
            model,
            posterior=None,
            num_samples=int(swag.num_samples),
            scale=float(swag.scale),
            task=task,
            covariance=swag.covariance,
            return_samples=bool(swag.return_samples),
            seed=None if swag.seed is None else int(swag.seed),
            chunk_size=None if swag.chunk_size is None else int(swag.chunk_size),
        )
        rank_zero_info(
            f"lightning-swag {subcommand}: SWAG {swag.covariance} BMA of {type(model).__name__} "
            f"({task}, {int(swag.num_samples)} samples, scale {float(swag.scale)})"
        )

    def _check_checkpoint(self, subcommand: str) -> None:
        """Fail early, with a CLI error, when ``--ckpt_path`` cannot provide a SWAG posterior."""
        parser = self._parser(subcommand)
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if not ckpt_path:
            parser.error(
                f"`lightning-swag {subcommand}` needs --ckpt_path: a checkpoint written by `lightning-swag fit` "
                "with lightning_swag.SWAGCallback in trainer.callbacks (e.g. "
                "<default_root_dir>/checkpoints/last.ckpt), or 'last' to use the newest one."
            )
        if ckpt_path in _CKPT_KEYWORDS or "://" in str(ckpt_path):
            return  # resolved by the Trainer
        if not os.path.isfile(ckpt_path):
            parser.error(f"--ckpt_path {ckpt_path!r}: no such file.")
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - unreadable here: let the Trainer report it
            return
        states = list(checkpoint.get("swag_posteriors") or []) + [
            state["posterior"]
            for state in checkpoint.get("callbacks", {}).values()
            if isinstance(state, dict) and isinstance(state.get("posterior"), dict)
        ]
        if not any(int(state.get("num_snapshots", 0)) > 0 for state in states):
            parser.error(
                f"--ckpt_path {ckpt_path!r} holds no SWAG posterior with snapshots: it was saved without "
                "lightning_swag.SWAGCallback in trainer.callbacks, or before the callback's first snapshot "
                "(check SWAGCallback's start_epoch against trainer.max_epochs)."
            )


def cli_main(args: ArgsType = None, **kwargs: Any) -> SWAGLightningCLI:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return it (``cli.trainer``, ``cli.model``...)."""
    return SWAGLightningCLI(args=args, **kwargs)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-swag`` console script."""
    cli_main(args)


if __name__ == "__main__":
    main()
