"""Regression with a noise model: heteroscedastic sine and scikit-learn's diabetes data, SWAG against
MAP, SWAG-Diagonal, MultiSWAG, a deep ensemble and laplace-torch's last-layer Laplace (aleatoric +
epistemic uncertainty, interval coverage, calibration). The SWAG scale is chosen on validation data
held out from the training data (``SWAGModule.tune_scale``).

The experiment lives in :mod:`lightning_swag.experiments.regression`; this script only runs it.
scikit-learn (diabetes) and laplace-torch (the Laplace baselines) are optional: without them those
parts are skipped with a message.

    python examples/regression.py                            # full protocol, about 2 minutes on 2 CPU cores
    python examples/regression.py --figures-dir docs/images  # also writes the README's figures
    python examples/regression.py --fast                     # reduced setting used by the tests
    python examples/regression.py --help                     # every option
"""

from lightning_swag.experiments.regression import main

if __name__ == "__main__":
    main()
