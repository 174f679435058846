"""Sine regression with SWA, SWAG-Diagonal, SWAG and MultiSWAG (the reference notebook's first experiment).

The experiment itself lives in the package's experiment kit, :mod:`lightning_swag.experiments.sine`,
so tests and benchmarks import it without path tricks; this script only runs it.

    python examples/sine.py            # full protocol, 3 runs: 43 s on 2 CPU cores (AMD EPYC)
    python examples/sine.py --fast     # reduced setting used by the tests
    python examples/sine.py --help     # every option
"""

import time

STARTED = time.perf_counter()  # before the imports of torch and Lightning: the printed total includes them

from lightning_swag.experiments.sine import main  # noqa: E402

if __name__ == "__main__":
    main(started=STARTED)
