"""A small BMA with lightning_swag as a built wheel installed it (run by .ci/check_wheel).

Run from a folder outside the checkout with the fresh environment's python; argv[1] is the checkout,
which the imported package must not come from.
"""

import importlib.metadata
import sys
from pathlib import Path

import torch
from torch import nn

import lightning_swag
from lightning_swag import BMA, SWAGPosterior

checkout = Path(sys.argv[1]).resolve()
where = Path(lightning_swag.__file__).resolve()
assert not where.is_relative_to(checkout), f"lightning_swag was imported from the checkout: {where}"
assert where.is_relative_to(Path(sys.prefix).resolve()), f"lightning_swag is not the wheel's: {where}"
assert (where.parent / "py.typed").is_file(), "the installed package has no py.typed"
version = importlib.metadata.version("lightning-swag")
assert lightning_swag.__version__ == version, (lightning_swag.__version__, version)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
posterior = SWAGPosterior.from_model(model, max_rank=3)
trained = {name: p.detach().clone() for name, p in model.named_parameters()}
with torch.no_grad():
    for _ in range(4):  # a few perturbed snapshots, as SGD iterates would be
        for name, p in model.named_parameters():
            p.copy_(trained[name] + 0.05 * torch.randn_like(p))
        posterior.collect(model)

out = BMA(model, posterior, num_samples=5, task="classification", seed=0)(torch.randn(6, 4))
probs = out["mean"]
assert probs.shape == (6, 3), probs.shape
assert torch.allclose(probs.sum(dim=-1), torch.ones(6, dtype=probs.dtype), atol=1e-5), probs.sum(dim=-1)
print(
    f"wheel smoke: lightning-swag {version} from {where.parent}: a BMA over 5 samples gave {tuple(probs.shape)}"
)
