"""The SWAG-LoRA experiment (``examples/lora.py``): its data, tokenizer and model, and the ``--fast`` run."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
from conftest import random_walk_posterior
from tiny_lora import explicit_linearized_probit

from lightning_swag import BMA, SWAGPosterior
from lightning_swag.experiments import lora

SIZES = {"pretrain_per_family": 40, "train_per_family": 30, "test_per_family": 20, "num_ood": 50}


@pytest.fixture(scope="module")
def splits() -> lora.LineSplits:
    return lora.build_splits(seed=0, **SIZES)


def _all_lines(splits: lora.LineSplits) -> list[list[str]]:
    return [splits.pretrain[0], splits.train[0], splits.test[0], splits.ood]


def test_the_splits_are_deterministic_for_a_seed(splits: lora.LineSplits) -> None:
    again = lora.build_splits(seed=0, **SIZES)
    assert _all_lines(again) == _all_lines(splits)
    assert again.pretrain[1] == splits.pretrain[1] and again.test[1] == splits.test[1]
    other = lora.build_splits(seed=1, **SIZES)
    assert other.train[0] != splits.train[0] and other.ood != splits.ood


def test_train_test_pretraining_and_ood_lines_are_disjoint(splits: lora.LineSplits) -> None:
    parts = [set(lines) for lines in _all_lines(splits)]
    assert [len(part) for part in parts] == [len(lines) for lines in _all_lines(splits)]  # no repeats
    for i, first in enumerate(parts):
        for second in parts[i + 1 :]:
            assert not first & second


def test_the_ood_lines_are_english_documentation_not_source(splits: lora.LineSplits) -> None:
    prose = set(lora.prose_lines())
    source = {line for family in lora.FINETUNE_FAMILIES for line in lora.family_lines(family)}
    assert set(splits.ood) <= prose and not set(splits.ood) & source
    assert all(len(line.split()) >= 6 for line in splits.ood)


def test_the_labels_are_balanced_and_name_the_package(splits: lora.LineSplits) -> None:
    finetune = lora.FINETUNE_FAMILIES
    assert splits.finetune_families == finetune
    assert splits.pretrain_families == lora.PRETRAIN_FAMILIES + finetune
    assert Counter(splits.train[1]) == dict.fromkeys(range(len(finetune)), SIZES["train_per_family"])
    assert Counter(splits.test[1]) == dict.fromkeys(range(len(finetune)), SIZES["test_per_family"])
    pretrain_counts = Counter(splits.pretrain[1])
    assert pretrain_counts == dict.fromkeys(range(12), SIZES["pretrain_per_family"])
    for line, label in zip(splits.test[0], splits.test[1], strict=True):
        assert line in lora.family_lines(finetune[label])


def test_disjoint_pretraining_sees_none_of_the_fine_tuning_packages() -> None:
    disjoint = lora.build_splits(seed=0, disjoint=True, **SIZES)
    assert disjoint.pretrain_families == lora.PRETRAIN_FAMILIES
    fine_tuning_source = {line for family in lora.FINETUNE_FAMILIES for line in lora.family_lines(family)}
    assert not set(disjoint.pretrain[0]) & fine_tuning_source
    with pytest.raises(ValueError, match="pretrain_families"):
        lora.build_splits(pretrain_families=("json", "email"), **SIZES)


def test_the_tokenizer_is_built_from_the_text_deterministically(splits: lora.LineSplits) -> None:
    texts = splits.train[0]
    tokenizer = lora.CodeTokenizer.fit(texts, vocab_size=300)
    assert lora.CodeTokenizer.fit(list(texts), vocab_size=300).vocab == tokenizer.vocab
    assert tokenizer.vocab[:4] == list(lora.SPECIAL_TOKENS) and len(tokenizer) <= 300
    assert len(set(tokenizer.vocab)) == len(tokenizer)
    assert {char for text in texts for char in text if not char.isspace()} <= set(tokenizer.vocab)


def test_the_tokenizer_spells_unknown_words_and_pads() -> None:
    tokenizer = lora.CodeTokenizer.fit(["self.loop = loop", "self.loop.close()", "x = 1"], vocab_size=100)
    assert tokenizer.tokenize("self.loop") == ["self", ".", "loop"]
    assert tokenizer.tokenize("sel") == ["s", "e", "l"]  # not a word of the vocabulary: spelt out
    assert tokenizer.tokenize("self £") == ["self", "[UNK]"]  # an unseen character
    encoded = tokenizer.encode(["self.loop", "x"], max_length=4)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert ids.shape == mask.shape == (2, 4)
    cls, sep = tokenizer.ids["[CLS]"], tokenizer.ids["[SEP]"]
    assert ids[0].tolist() == [cls, tokenizer.ids["self"], tokenizer.ids["."], sep]  # truncated
    assert ids[1].tolist() == [cls, tokenizer.ids["x"], sep, 0] and mask[1].tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="must start with"):
        lora.CodeTokenizer(["a", "b"])


def test_the_lora_model_trains_the_adapters_and_the_head_only() -> None:
    torch.manual_seed(0)
    net = lora.add_lora(lora.build_model(vocab_size=50, num_labels=3, hidden_size=16, num_heads=2), rank=4)
    module = lora.SequenceClassifier(net)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert set(SWAGPosterior.from_model(module, include="lora").param_names) == trainable
    head = SWAGPosterior.from_model(module, include=[lora.HEAD_PATTERN]).param_names
    assert (
        sorted(head) == sorted(n for n in trainable if "classifier.modules_to_save" in n) and len(head) == 2
    )
    batch = {"input_ids": torch.randint(1, 50, (5, 7)), "attention_mask": torch.ones(5, 7, dtype=torch.long)}
    assert module(**batch).shape == (5, 3)


def test_fast_keeps_one_seed() -> None:
    args = lora.parse_args(["--fast", "--seeds", "3,4"])
    assert args.seeds == [3] and args.num_samples == 10
    assert lora.parse_args([]).seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        lora.parse_args(["--seeds", "1,1"])


@pytest.mark.slow
def test_lora_example_fast(tmp_path) -> None:
    out = tmp_path / "out"
    result = lora.run(lora.parse_args(["--fast", "--out", str(out)]))
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["methods"]) == set(lora.METHODS)
    chance = 1 / len(lora.FINETUNE_FAMILIES)
    for name, row in saved["methods"].items():
        assert set(row) == {"accuracy", "nll", "ece", "auroc"}, name
        assert all(math.isfinite(value) for value in row.values()), name
        assert row["accuracy"] > chance + 0.15, name  # chance is 1/6
        assert row["nll"] > 0 and 0 <= row["ece"] <= 1 and 0 <= row["auroc"] <= 1, name
        assert row == pytest.approx(result["methods"][name])
    assert "| swag |" in (out / "results.md").read_text()
    assert (out / "reliability.png").stat().st_size > 10_000

    # SWA is the plain forward of a copy of the model with the adapters and head at the posterior mean.
    seed_result, data = result["artifacts"]["seed_result"], result["artifacts"]["data"]
    model, posterior = seed_result.runs[0]
    swa_model = copy.deepcopy(model).eval()
    params = dict(swa_model.named_parameters())
    offset, mean = 0, posterior.mean
    with torch.no_grad():
        for name in posterior.param_names:
            size = params[name].numel()
            params[name].copy_(mean[offset : offset + size].view_as(params[name]))
            offset += size
    assert offset == mean.numel() and any(not torch.equal(params[n], p) for n, p in model.named_parameters())
    expected = lora.predict_probs(lora.plain_predict(swa_model), data.test)
    torch.testing.assert_close(seed_result.probs["swa"][0], expected, atol=1e-5, rtol=1e-4)


def test_the_linearised_predictive_on_the_examples_adapters_is_the_explicit_formula() -> None:
    """The example's model (a config-built BERT with LoRA and a trained classifier copy) under an
    adapter posterior, on padded lines: the linearised predictive equals the probit formula computed
    from an explicit Jacobian of the logits with respect to the adapter weights."""
    torch.manual_seed(0)
    module = lora.SequenceClassifier(lora.add_lora(lora.build_model(50, 6, hidden_size=32), rank=4)).eval()
    posterior = random_walk_posterior(module, snapshots=5, max_rank=4, step=0.05)
    assert set(posterior.param_shapes) == {
        n for n, _ in module.named_parameters() if "lora_" in n or "modules_to_save" in n
    }
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(5, 12, dtype=torch.long)
    mask[1, 7:] = mask[3, 4:] = 0
    batch = {"input_ids": torch.randint(4, 50, (5, 12), generator=g) * mask, "attention_mask": mask}
    bma = BMA(module, posterior, predictive="linearized", task="classification", seed=0)
    expected = explicit_linearized_probit(module, posterior, batch, scale=0.5)
    torch.testing.assert_close(bma(batch)["mean"].double(), expected, atol=2e-6, rtol=1e-5)
