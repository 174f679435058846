"""Sine regression with SWA, SWAG-Diagonal and SWAG (the reference notebook's first experiment).

The experiment itself lives in the package's experiment kit, :mod:`lightning_swag.experiments.sine`,
so tests and benchmarks import it without path tricks; this script only runs it.

    python examples/sine.py            # full protocol, ~30 s on 2 CPU cores
    python examples/sine.py --fast     # reduced setting used by the tests
    python examples/sine.py --help     # every option
"""

from lightning_swag.experiments.sine import main

if __name__ == "__main__":
    main()
