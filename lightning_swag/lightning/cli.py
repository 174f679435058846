"""The ``lightning-swag`` command line: Lightning's ``LightningCLI`` with SWAG for test and predict.

``fit`` and ``validate`` run the configured model as is; put ``SWAGCallback`` in
``trainer.callbacks`` to collect the posterior during ``fit`` (it is saved in every checkpoint).
``test`` and ``predict`` wrap the model into :class:`~lightning_swag.SWAGModule`, restore the weights
*and* the SWAG posterior from ``--ckpt_path`` and run Bayesian model averaging; ``predict`` writes
the result with :class:`~lightning_swag.lightning.writer.SWAGPredictionWriter`::

    lightning-swag fit --config examples/configs/sine.yaml
    lightning-swag predict --config examples/configs/sine.yaml --ckpt_path runs/sine/checkpoints/last.ckpt

The ``swag`` options (``--swag.num_samples``, ``--swag.scale``, ...) are accepted by every subcommand,
so one config file serves them all, but only ``test`` and ``predict`` use them.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

# Imported so that jsonargparse resolves the short name ``--trainer.callbacks+=SWAGCallback``. Models
# and DataModules are named by class path (``--model lightning_swag.experiments.models.SineRegressor``).
from lightning_swag.lightning.callback import SWAGCallback  # noqa: F401
from lightning_swag.lightning.module import SWAGModule
from lightning_swag.lightning.quiet import quiet_lightning, verbose
from lightning_swag.lightning.writer import SWAGPredictionWriter
from lightning_swag.likelihoods import infer_task
from lightning_swag.posterior.format import has_snapshots, load_file
from lightning_swag.predictive.bma import BMA

__all__ = ["SWAGLightningCLI", "cli_main", "infer_task", "main"]

DESCRIPTION = """SWAG (Stochastic Weight Averaging Gaussian) uncertainty for a LightningModule. `fit` trains
it; with lightning_swag.SWAGCallback in trainer.callbacks it also collects a Gaussian posterior over
the weights, saved in every checkpoint. `test` and `predict` restore the weights and the posterior
from --ckpt_path and run Bayesian model averaging over weight samples (--swag.* options): test
metrics with uncertainty, or predictive means and standard deviations written to files. Example:
lightning-swag fit --config examples/configs/sine.yaml, then lightning-swag predict --config
examples/configs/sine.yaml --ckpt_path runs/sine/checkpoints/last.ckpt."""

_CKPT_KEYWORDS = ("last", "best", "hpc")
# BMA arguments that are objects, not options: the model comes from --model, the posterior from
# --ckpt_path; bn_loader, output_transform, batch_inputs and progress are for Python users.
_NOT_OPTIONS = {"model", "posterior", "bn_loader", "output_transform", "batch_inputs", "progress"}


class SaveFitConfigCallback(SaveConfigCallback):
    """Save the resolved config to the log folder for ``fit`` runs only (overwriting it).

    ``test``/``predict`` runs usually share ``fit``'s folder and must not clobber its ``config.yaml``.
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class SWAGLightningCLI(LightningCLI):
    """``LightningCLI`` whose ``test``/``predict`` run Bayesian model averaging with SWAG.

    Any LightningModule / LightningDataModule can be selected by class path
    (``--model lightning_swag.experiments.models.SineRegressor``). For ``test`` and ``predict`` the
    model is wrapped into ``SWAGModule(model, posterior=None, **swag)``, where the ``--swag.*``
    options are :class:`SWAGModule`'s own arguments (built from its signature, with its defaults);
    the checkpoint given with ``--ckpt_path`` (one written by ``fit`` with ``SWAGCallback``) restores
    both the weights and the posterior. ``predict`` writes its output with a
    :class:`SWAGPredictionWriter` configured by the ``--predictions.*`` options (its signature;
    default folder ``<trainer.default_root_dir>/predictions``) unless a prediction writer is already
    in ``trainer.callbacks``; predictions are not also kept in memory unless
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
        parser_kwargs = {"prog": "lightning-swag", "description": DESCRIPTION, **(parser_kwargs or {})}
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
    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parsers that reject abbreviated options: ``--trainer.max_epoch`` is an error, not ``max_epochs``."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--swag.*`` (the options of SWAGModule, which are BMA's, documented there) and
        ``--predictions.*`` (SWAGPredictionWriter's), both from the signatures, so names, types,
        defaults and help stay those of the classes."""
        parser.add_class_arguments(
            BMA,
            "swag",
            instantiate=False,
            skip=_NOT_OPTIONS,
            sub_configs=True,
        )
        parser.add_class_arguments(SWAGPredictionWriter, "predictions", instantiate=False)

    # ------------------------------------------------------------------ instantiation
    @override
    def before_instantiate_classes(self) -> None:
        """Quiet runs print no model summary unless the config or the command line asks for one."""
        trainer = self.config[self.subcommand]["trainer"] if self.subcommand else self.config["trainer"]
        if not verbose() and trainer.get("enable_model_summary") is None:
            trainer["enable_model_summary"] = False

    @override
    def instantiate_classes(self) -> None:
        """Instantiate as usual; report argument errors raised by constructors as CLI errors."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            own = None if os.environ.get("JSONARGPARSE_DEBUG") else _own_error(err)
            if own is None:
                self._parser(self.subcommand).error(
                    f"Invalid configuration ({type(err).__name__}): {err} (set JSONARGPARSE_DEBUG=1 for a "
                    "traceback)",
                    ex=err,
                )
            # the package's own message first and alone: the parser's account of it (every type of a
            # Union it tried, the whole usage) buries it; JSONARGPARSE_DEBUG=1 still shows all of it
            sys.stderr.write(
                f"lightning-swag {self.subcommand}: error: {own} (set JSONARGPARSE_DEBUG=1 for the parser's "
                "details and a traceback)\n"
            )
            raise SystemExit(2) from err

    @override
    def _parse_ckpt_path(self) -> None:
        """Apply the checkpoint's model hyperparameters to the config, as ``LightningCLI`` does, with two
        additions: a damaged checkpoint is a CLI error that names the file, and checkpoints written
        outside the CLI (``trainer.save_checkpoint`` in a script or notebook), whose hyperparameters
        carry no class path, go to the configured model class.

        This overrides a private ``LightningCLI`` method (called from its ``__init__`` right after
        parsing); ``tests/lightning/test_cli.py`` fails loudly if Lightning renames or stops calling it."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        try:
            checkpoint = load_file(ckpt_path, "checkpoint")
        except ValueError as err:
            self._parser(subcommand).error(f"--ckpt_path: {err}", ex=err)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        model = self.config[subcommand].get("model")
        class_path = model.get("class_path") if model is not None else None
        if not hparams or "_class_path" in hparams or not class_path:
            return super()._parse_ckpt_path()
        update = {subcommand: {"model": {"class_path": class_path, "init_args": hparams}}}
        self.config = self.parser.parse_object(update, self.config)

    # ------------------------------------------------------------------ subcommand hooks
    def before_test(self) -> None:
        """Wrap the model into ``SWAGModule`` (weights and posterior come from ``--ckpt_path``)."""
        self._wrap_model("test")

    def before_predict(self) -> None:
        """Wrap the model into ``SWAGModule`` and make sure the predictions are written to a file."""
        self._wrap_model("predict")
        config = self.config_init["predict"]
        if config.get("return_predictions") is None:
            config["return_predictions"] = False  # the writer has them; don't also hold them in memory
        # Trainer sets ``callbacks`` in its callback connector and does not declare it on the class
        callbacks: list[Callback] = self.trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, BasePredictionWriter) for cb in callbacks):
            options = dict(self.config_init["predict"]["predictions"])
            try:
                writer = SWAGPredictionWriter(**options)
            except ValueError as err:
                self._parser("predict").error(f"--predictions: {err}", ex=err)
            callbacks.append(writer)

    def _wrap_model(self, subcommand: str) -> None:
        self._check_checkpoint(subcommand)
        options = dict(self.config_init[subcommand]["swag"])
        model = self.model
        try:
            self.model = SWAGModule(model, posterior=None, **options)
        except (ValueError, TypeError) as err:
            self._parser(subcommand).error(f"--swag: {err}", ex=err)
        swag = self.model
        rank_zero_info(
            f"lightning-swag {subcommand}: SWAG {swag.covariance} BMA of {type(model).__name__} "
            f"({swag.task}, {swag.num_samples} samples, scale {swag.scale})"
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
            checkpoint = load_file(ckpt_path, "checkpoint")
        except ValueError as err:
            parser.error(f"--ckpt_path: {err}", ex=err)
        if not has_snapshots(checkpoint):
            parser.error(
                f"--ckpt_path {ckpt_path!r} holds no SWAG posterior with snapshots: it was saved without "
                "lightning_swag.SWAGCallback in trainer.callbacks, or before the callback's first snapshot "
                "(check SWAGCallback's start_epoch against trainer.max_epochs)."
            )


def _own_error(err: BaseException) -> BaseException | None:
    """The innermost exception of ``err``'s chain when lightning-swag's own code raised it (a value the
    package checks, e.g. ``SWAGCallback: max_rank must be an int >= 0``), else None."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inner, outer = err, err.__cause__ or err.__context__
    while outer is not None:
        inner, outer = outer, outer.__cause__ or outer.__context__
    frames = traceback.extract_tb(inner.__traceback__)
    raised_here = bool(frames) and os.path.abspath(frames[-1].filename).startswith(package + os.sep)
    return inner if raised_here else None


def cli_main(args: ArgsType = None, **kwargs: Any) -> SWAGLightningCLI:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return it (``cli.trainer``, ``cli.model``...).

    It runs quiet (:func:`~lightning_swag.lightning.quiet.quiet_lightning`: no accelerator and tips
    banners, no model summary unless ``--trainer.enable_model_summary true``);
    ``LIGHTNING_SWAG_VERBOSE=1`` in the environment gives Lightning's own output back."""
    with quiet_lightning():
        return SWAGLightningCLI(args=args, **kwargs)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-swag`` console script."""
    cli_main(args)


if __name__ == "__main__":
    main()
