"""MNIST with SGD, SWA, SWAG-Diagonal, SWAG and MultiSWAG (the reference notebook's second experiment).

The experiment itself lives in the package's experiment kit, :mod:`lightning_swag.experiments.mnist`,
so tests and benchmarks import it without path tricks; this script only runs it.

    python examples/mnist.py --data-dir ../shared/data          # full protocol
    python examples/mnist.py --data-dir ../shared/data --fast   # about a minute on CPU
    python examples/mnist.py --help                             # every option
"""

from lightning_swag.experiments.mnist import main

if __name__ == "__main__":
    main()
