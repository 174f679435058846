"""The experiment kit: reference data, models, plots and the experiments.

Everything here *uses* the core (``lightning_swag.posterior.swag``, ``callback``, ``module``, ...) to
reproduce and extend the reference notebook; the core never imports from here. It needs
torchvision (MNIST) and matplotlib (figures), which the package installs by default.

* :mod:`~lightning_swag.experiments.data`: ``SineDataModule``, ``MNISTDataModule``.
* :mod:`~lightning_swag.experiments.models`: ``SineRegressor``, ``MNISTClassifier``, ``MNISTConvClassifier``.
* :mod:`~lightning_swag.experiments.plots`: the figures of the examples.
* :mod:`~lightning_swag.experiments.baselines`: what SWAG is compared with (temperature scaling, deep
  ensembles, laplace-torch's last-layer Laplace).
* :mod:`~lightning_swag.experiments.sine`, :mod:`~lightning_swag.experiments.mnist`,
  :mod:`~lightning_swag.experiments.regression`, :mod:`~lightning_swag.experiments.lora`,
  :mod:`~lightning_swag.experiments.shift`: the experiments that ``examples/sine.py``,
  ``examples/mnist.py``, ``examples/regression.py``, ``examples/lora.py`` and ``examples/shift.py``
  run (LoRA needs the ``lora`` extra: transformers, peft); :mod:`~lightning_swag.experiments.shift_report`
  turns the shift benchmark's ``metrics.json`` into its results page.
"""
