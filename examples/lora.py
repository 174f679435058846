"""SWAG over LoRA adapters: a small BERT pretrained on standard-library source, LoRA-fine-tuned on
other packages, with LoRA, SWA, SWAG, MultiSWAG and last-layer linearised SWAG compared.

The experiment lives in the package's experiment kit, :mod:`lightning_swag.experiments.lora`, so
tests import it without path tricks; this script only runs it. Everything runs offline: the text is
the Python installation's own source and documentation, and the tokenizer is built locally.

    python examples/lora.py --fast --out outputs/lora   # one seed, about two minutes on 2 CPU cores
    python examples/lora.py --out outputs/lora          # seeds 0,1,2, mean ± std over seeds
    python examples/lora.py --help                      # every option
"""

from lightning_swag.experiments.lora import main

if __name__ == "__main__":
    main()
