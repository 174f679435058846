"""SWAG over peft LoRA adapters, end to end on a config-built BERT (no download): the tracked set, the
SWA mean at ``scale=0``, a saved posterior on a freshly built peft model, and ``export_adapter``
round trips (the mean and a sample, loaded by ``PeftModel.from_pretrained``, predict as the module)."""

from __future__ import annotations

import copy
import json

import lightning as L
import peft
import pytest
import torch
from conftest import QUIET, random_walk_posterior
from tiny_lora import LABELS, VOCAB, base_bert, explicit_linearized_probit, lora_model
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_swag import BMA, SWAGCallback, SWAGModule, SWAGPosterior, export_adapter


def batches(n: int = 24, seed: int = 0) -> list[dict[str, Tensor]]:
    """Padded token sequences with labels (a label that depends on the tokens, so training learns)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 9), generator=g)
    mask = torch.ones(n, 9, dtype=torch.long)
    for i in range(n):
        mask[i, 5 + i % 4 :] = 0
    labels = (ids[:, 0] % LABELS).long()
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


class LoraClassifier(L.LightningModule):
    """A LightningModule holding the peft model, as users write it (mapping batches, ``.logits``)."""

    def __init__(self, seed: int = 5) -> None:
        super().__init__()
        self.model = lora_model(seed).train()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


@pytest.fixture(scope="module")
def fitted() -> tuple[LoraClassifier, SWAGCallback]:
    """Five epochs of LoRA fine-tuning, SWAG collected over the adapters from epoch 1."""
    torch.manual_seed(0)
    module = LoraClassifier()
    swag = SWAGCallback(include="lora", start_epoch=1, max_rank=3)
    trainer = L.Trainer(**QUIET, max_epochs=5, callbacks=[swag])
    trainer.fit(module, DataLoader(batches(), batch_size=8))
    return module, swag


def inputs() -> dict[str, Tensor]:
    rows = batches(6, seed=9)
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}


def adapter_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if "lora_" in n or "modules_to_save" in n}


def test_the_tracked_set_is_exactly_the_adapters(fitted) -> None:
    module, swag = fitted
    names = set(swag.posterior.param_shapes)
    assert names == adapter_names(module) and names
    assert {n.split(".")[-2] for n in names if "lora_" in n} == {"default"}
    assert sum(1 for n in names if "modules_to_save" in n) == 2  # the classifier's weight and bias
    assert swag.posterior.num_snapshots == 4


def test_scale_zero_is_the_swa_mean_adapter_forward(fitted) -> None:
    module, swag = fitted
    swa = copy.deepcopy(module)
    swag.posterior.load_into(swa)
    expected = swa(**inputs())
    bma = BMA(module, swag.posterior, num_samples=1, scale=0.0, task="regression", seed=0)
    torch.testing.assert_close(bma(inputs())["mean"], expected, atol=1e-6, rtol=1e-5)


def test_a_saved_posterior_predicts_the_same_on_a_new_peft_model(fitted, tmp_path) -> None:
    module, swag = fitted
    swag.posterior.save(tmp_path / "posterior.pt")
    fresh = LoraClassifier()  # the same base, the adapters at their initial values
    loaded = SWAGPosterior.load(tmp_path / "posterior.pt")
    ours = BMA(module, swag.posterior, num_samples=4, task="classification", seed=3)(inputs())
    theirs = BMA(fresh, loaded, num_samples=4, task="classification", seed=3)(inputs())
    for key in ("mean", "std", "entropy"):
        torch.testing.assert_close(theirs[key], ours[key], atol=0, rtol=0)


def load_exported(directory) -> nn.Module:
    """What a tool that knows nothing of SWAG does: the base model, then ``from_pretrained``."""
    return peft.PeftModel.from_pretrained(base_bert(), str(directory)).eval()


def test_export_of_the_mean_loads_as_the_swa_model(fitted, tmp_path) -> None:
    module, swag = fitted
    path = export_adapter(module, swag.posterior, tmp_path / "swa")
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 2
    with torch.no_grad():
        logits = load_exported(path)(**inputs()).logits
    bma = BMA(module, swag.posterior, num_samples=1, scale=0.0, task="regression", seed=0)
    torch.testing.assert_close(logits, bma(inputs())["mean"], atol=1e-6, rtol=1e-5)
    # the SWA mean differs from the last weights, so the equality above is not the model's own forward
    assert not torch.allclose(logits, module(**inputs()).detach(), atol=1e-4)


@pytest.mark.parametrize("sample", [0, 3])
@pytest.mark.parametrize("through", ["lightning_module", "peft_model"])
def test_export_of_a_sample_predicts_as_the_modules_own_sample(fitted, tmp_path, sample, through) -> None:
    module, swag = fitted
    model = module if through == "lightning_module" else module.model
    path = export_adapter(model, swag.posterior, tmp_path / f"s{sample}", sample=sample, scale=0.5, seed=11)
    with torch.no_grad():
        logits = load_exported(path)(**inputs()).logits
    loader = DataLoader(batches(6, seed=9), batch_size=4)
    for num_samples in (sample + 1, 6):  # sample i is the same whatever num_samples
        swag_module = SWAGModule(
            module, swag.posterior, num_samples=num_samples, scale=0.5, seed=11, return_samples=True
        )
        parts = L.Trainer(**QUIET).predict(swag_module, loader)
        samples = torch.cat([part["samples"] for part in parts], dim=1)
        torch.testing.assert_close(logits, samples[sample], atol=1e-6, rtol=1e-5)
    others = BMA(module, swag.posterior, num_samples=6, scale=0.5, seed=11, return_samples=True)(inputs())
    assert not torch.allclose(logits, others["samples"][(sample + 1) % 6], atol=1e-4)


def test_export_refuses_what_an_adapter_cannot_hold(fitted, tmp_path) -> None:
    module, _ = fitted
    with_base = random_walk_posterior(module.model, snapshots=3)  # include=None would be the adapters...
    unfrozen = copy.deepcopy(module)
    unfrozen.model.base_model.model.bert.pooler.requires_grad_(True)
    base = SWAGPosterior.from_model(unfrozen, include=["model.base_model.model.bert.pooler.*"])
    base.collect(unfrozen)
    with pytest.raises(ValueError, match='does not hold.*include="lora"'):
        export_adapter(module, base, tmp_path / "x")
    assert set(with_base.param_shapes) == adapter_names(module.model)  # ...which export accepts
    before = {n: t.clone() for n, t in module.state_dict().items()}
    for holder in (module.model, module):  # names relative to the peft model, either holder given
        loaded = load_exported(export_adapter(holder, with_base, tmp_path / type(holder).__name__))
        torch.testing.assert_close(
            loaded.state_dict()["base_model.model.classifier.modules_to_save.default.bias"],
            with_base.unflatten(with_base.mean)[
                "base_model.model.classifier.modules_to_save.default.bias"
            ].float(),
        )
    assert all(torch.equal(t, before[n]) for n, t in module.state_dict().items())  # never modified
    with pytest.raises(ValueError, match="holds no peft.PeftModel"):
        export_adapter(base_bert(), with_base, tmp_path / "y")
    with pytest.raises(ValueError, match="not a tensor of the peft model"):
        export_adapter(lora_model_other_target(), with_base, tmp_path / "z")
    with pytest.raises(ValueError, match="sample must be an int >= 0"):
        export_adapter(module, with_base, tmp_path / "w", sample=-1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "w").exists()


def lora_model_other_target() -> nn.Module:
    config = peft.LoraConfig(r=2, target_modules=["key"], lora_dropout=0.0)
    return peft.get_peft_model(base_bert(), config)


def test_the_linearised_predictive_on_an_adapter_posterior_is_the_explicit_formula(fitted) -> None:
    """Padded batches through a LightningModule holding the peft model, in ``trainer.predict``."""
    module, swag = fitted
    loader = DataLoader(batches(6, seed=9), batch_size=4)
    bma = SWAGModule(module, swag.posterior, predictive="linearized", task="classification", seed=0)
    parts = L.Trainer(**QUIET).predict(bma, loader)
    expected = explicit_linearized_probit(module.eval(), swag.posterior, inputs(), scale=0.5)
    torch.testing.assert_close(torch.cat([p["mean"] for p in parts]).double(), expected, atol=2e-6, rtol=1e-5)
    assert (expected.max(-1).values < 0.999).all()  # not saturated: the variance term matters


def test_adapters_in_the_last_block_run_the_whole_model_and_the_plan_says_why() -> None:
    """The split path runs a frozen prefix once only when the tracked submodule's output is the model's;
    LoRA inside an attention block is not, so every sample runs the whole model, and the plan says so."""
    config = peft.LoraConfig(
        r=2, target_modules=["query", "value"], layers_to_transform=[1], lora_dropout=0.0
    )
    model = peft.get_peft_model(base_bert(), config)
    post = random_walk_posterior(model, snapshots=3)
    assert all(".layer.1." in name for name in post.param_shapes)
    bma = BMA(model, post, num_samples=3, task="classification", seed=0)
    bma(inputs())
    plan = bma.execution_plan
    assert plan is not None and plan.split is None
    assert "not the output of 'base_model.model.bert.encoder.layer.1.attention.self'" in plan.split_refused
