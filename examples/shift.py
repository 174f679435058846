"""Uncertainty under distribution shift: rotated and corrupted MNIST, Fashion-MNIST and noise as OOD.

The experiment lives in the package's experiment kit, :mod:`lightning_swag.experiments.shift`; this
script only runs it.

    python examples/shift.py --data-dir ../shared/data --seeds 0,1,2 --out outputs/shift   # full run
    python examples/shift.py --data-dir ../shared/data --fast --out /tmp/shift             # about a minute
    python examples/shift.py --help                                                        # every option
"""

from lightning_swag.experiments.shift import main

if __name__ == "__main__":
    main()
