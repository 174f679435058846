"""The Lightning glue: :class:`~lightning_swag.lightning.callback.SWAGCallback` collects a posterior
during ``trainer.fit``, :class:`~lightning_swag.lightning.module.SWAGModule` predicts and tests with
it, :class:`~lightning_swag.lightning.writer.SWAGPredictionWriter` writes its predictions, and
:mod:`~lightning_swag.lightning.cli` is the ``lightning-swag`` command. Everything else of the
package is plain torch.
"""
