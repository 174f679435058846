"""The batch layout: a mapping input the model does not take as keyword arguments gets an error that
says how SWAGModule passes it and how to pass it otherwise."""

from __future__ import annotations

import pytest
import torch
from conftest import random_walk_posterior
from torch import nn

from lightning_swag import SWAGModule
from lightning_swag.predictive.batches import call_model


class WholeBatchModel(nn.Module):
    """A model whose forward takes the whole (dict) batch, as many LightningModules do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lin(batch["input_ids"])


class WholeBatchSWAG(SWAGModule):
    """The documented fix: a tuple is passed as positional arguments, so the mapping arrives whole."""

    def batch_inputs(self, batch):
        return (batch,)


def _model_and_posterior() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = WholeBatchModel()
    return model, random_walk_posterior(model)


def test_a_mapping_the_forward_does_not_take_as_keywords_says_how_to_pass_it() -> None:
    model, post = _model_and_posterior()
    batch = {"input_ids": torch.randn(4, 3), "labels": torch.zeros(4, 2)}
    bma = SWAGModule(model, post, task="regression", num_samples=3, seed=0)
    with pytest.raises(TypeError, match="keyword arguments") as err:
        bma.predict_step(batch, 0)
    message = str(err.value)
    assert "model(**inputs)" in message and "['input_ids']" in message
    assert "override batch_inputs" in message and "(batch,)" in message
    assert isinstance(err.value.__cause__, TypeError)  # the original error is chained
    assert "unexpected keyword argument 'input_ids'" in str(err.value.__cause__)

    # and the fix the message gives works: the same BMA as calling the model on the whole batch
    fixed = WholeBatchSWAG(model, post, task="regression", num_samples=3, seed=0, scale=0.0)
    out = fixed.predict_step(batch, 0)
    with torch.no_grad():
        post.load_into(model)
        torch.testing.assert_close(out["mean"], model(batch))


def test_other_type_errors_of_the_model_pass_through_unchanged() -> None:
    def forward(**inputs: torch.Tensor) -> torch.Tensor:
        raise TypeError("unsupported operand type(s) for +: 'Tensor' and 'str'")

    with pytest.raises(TypeError, match="^unsupported operand") as err:
        call_model(forward, {"x": torch.zeros(1)})
    assert err.value.__cause__ is None


def test_to_device_moves_every_tensor_and_keeps_the_structure() -> None:
    from collections import OrderedDict, namedtuple

    import torch

    from lightning_swag.predictive.batches import to_device

    Pair = namedtuple("Pair", ["x", "mask"])
    batch = {
        "pair": Pair(torch.ones(2), torch.zeros(2, dtype=torch.bool)),
        "list": [torch.arange(3), "text", 4],
        "ordered": OrderedDict(a=torch.ones(1)),
    }
    moved = to_device(batch, torch.device("meta"))
    assert type(moved["pair"]) is Pair and moved["pair"].x.is_meta and moved["pair"].mask.is_meta
    assert moved["list"][0].is_meta and moved["list"][1:] == ["text", 4]
    assert type(moved["ordered"]) is OrderedDict and moved["ordered"]["a"].is_meta
    assert not batch["pair"].x.is_meta  # the input is left as it was


def test_first_examples_cuts_the_tensors_with_the_batch_first_and_keeps_the_rest() -> None:
    from lightning_swag.predictive.batches import CallArguments, first_examples

    x, mask, table = torch.arange(12.0).reshape(6, 2), torch.ones(6, 3), torch.zeros(4, 6)
    cut = first_examples({"x": x, "extra": (mask, table, 7)}, batch=6, count=2)
    assert torch.equal(cut["x"], x[:2]) and torch.equal(cut["extra"][0], mask[:2])
    assert cut["extra"][1] is table and cut["extra"][2] == 7
    call = first_examples(CallArguments((x,), {"scale": torch.tensor(2.0)}), batch=6, count=2)
    assert isinstance(call, CallArguments) and torch.equal(call.args[0], x[:2])
    assert first_examples(table, batch=6, count=2) is None  # nothing has the batch first
