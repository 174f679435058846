"""SWAG over LoRA adapters: a small BERT fine-tuned with LoRA, and SWAG collected over the adapters.

A small transformer (``transformers.BertForSequenceClassification`` built from a config, nothing
downloaded) is pretrained, all weights, to tell which standard-library package a line of Python
source comes from, over twelve packages (:data:`PRETRAIN_FAMILIES` and :data:`FINETUNE_FAMILIES`).
A fresh model with these weights and a new head is then LoRA-fine-tuned (``peft``: rank-``--rank``
adapters on the attention ``query``/``value``, the ``classifier`` head trained in full through
``modules_to_save``) on a second task: classifying *other* lines (never seen in pretraining) of the
six :data:`FINETUNE_FAMILIES`. Fine-tuning runs Adam for ``--finetune-epochs`` epochs, then
``--collect-epochs`` more at the same constant learning rate while ``SWAGCallback(include="lora")``
takes ``--snapshots-per-epoch`` snapshots per epoch. The text is the Python installation's own
source (``sysconfig.get_paths()["stdlib"]``) and the tokenizer (:class:`CodeTokenizer`, words with
a character fallback) is built from the training lines, so everything runs offline.

With ``--disjoint`` the pretraining classes are the six :data:`PRETRAIN_FAMILIES` only. This small
model then transfers almost nothing: its frozen token embeddings carry no information about the
fine-tuning packages' vocabulary, and LoRA on ``query``/``value`` reaches about 25-30% accuracy
(chance: 17%), no better than from a randomly initialised encoder.

Methods (the keys of ``metrics.json``):

* ``lora``: the final weights of the fine-tuning run (the same epochs as SWAG's trajectory);
* ``swa``: the SWA mean of the adapters (``SWAGModule(..., scale=0, num_samples=1)``);
* ``swag``: Bayesian model averaging over ``--num-samples`` samples of the adapter posterior;
* ``multiswag``: three independent fine-tuning runs, their posteriors together;
* ``last_layer_linearized``: a SWAG posterior over the classifier head only, collected by training
  the head alone for ``--collect-epochs`` more epochs on top of the final LoRA model, predicted
  with ``predictive="linearized"`` (probit).

Every method is evaluated on held-out lines of the fine-tuning packages (accuracy, NLL, ECE) and
against English prose from the documentation that ships with Python (``pydoc_data.topics``) as
out-of-distribution input (AUROC of the predictive entropy). Train, test and OOD lines are
disjoint (duplicates and lines found in several packages are dropped) and the split is fixed by
``--data-seed``. Writes ``metrics.json``, ``results.md`` and ``reliability.png`` to ``--out``.

    python examples/lora.py --fast --out outputs/lora   # one seed, about two minutes on 2 CPU cores
    python examples/lora.py --out outputs/lora          # seeds 0,1,2: mean ± std over seeds
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import random
import re
import statistics
import sysconfig
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior, metrics
from lightning_swag.experiments.machine import machine_description
from lightning_swag.experiments.plots import plot_reliability_diagrams, save_figure
from lightning_swag.experiments.trainer import quiet_trainer
from lightning_swag.lightning.quiet import quiet_lightning

__all__ = [
    "FINETUNE_FAMILIES",
    "HEAD_PATTERN",
    "METHODS",
    "PRETRAIN_FAMILIES",
    "CodeTokenizer",
    "Encoded",
    "LineSplits",
    "SeedResult",
    "SequenceClassifier",
    "add_lora",
    "build_model",
    "build_splits",
    "encode_splits",
    "evaluate",
    "family_lines",
    "finetune_run",
    "head_run",
    "main",
    "make_loader",
    "method_predictors",
    "parse_args",
    "plain_predict",
    "predict_probs",
    "pretrain",
    "prose_lines",
    "run",
    "run_seed",
]

PRETRAIN_FAMILIES = ("distutils", "idlelib", "importlib", "lib2to3", "tkinter", "xml")
"""Standard-library packages seen only in pretraining (which classifies a line by its package)."""
FINETUNE_FAMILIES = ("asyncio", "email", "http", "logging", "multiprocessing", "unittest")
"""Standard-library packages of the LoRA fine-tuning task (also pretraining classes, with other lines,
unless ``--disjoint``)."""
METHODS = ("lora", "swa", "swag", "multiswag", "last_layer_linearized")
"""The methods compared, in table order (the keys of ``metrics.json``'s ``methods``)."""
METRICS = ("accuracy", "nll", "ece", "auroc")
HEAD_PATTERN = "*classifier.modules_to_save.*"
"""The trained copy of the classifier head in a peft model (``modules_to_save=["classifier"]``)."""
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
_TEST_DIRS = {"test", "tests", "idle_test"}
_PIECES = re.compile(r"[A-Za-z]+|\d+|\S")


# ---------------------------------------------------------------------------------------- data
def _keep_code_line(line: str) -> bool:
    return 20 <= len(line) <= 200 and not line.startswith("#")


def family_lines(family: str, root: Path | None = None) -> list[str]:
    """The distinct stripped source lines (20-200 characters, no comments) of a stdlib package, sorted.

    Test folders (``test``, ``tests``, ``idle_test``) are left out: some installations omit them.
    """
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    lines: set[str] = set()
    for path in sorted((root / family).rglob("*.py")):
        if _TEST_DIRS.intersection(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        lines.update(s for s in (raw.strip() for raw in text.splitlines()) if _keep_code_line(s))
    return sorted(lines)


def prose_lines() -> list[str]:
    """Distinct English prose lines of the documentation shipped with Python (``pydoc_data.topics``).

    Unindented lines of 30-200 characters, at least six words, at least 90% letters and spaces
    (indented lines are mostly code examples and grammar), sorted.
    """
    from pydoc_data.topics import topics

    lines: set[str] = set()
    for key in sorted(topics):
        for raw in topics[key].splitlines():
            line = raw.strip()
            if raw.startswith(" ") or not 30 <= len(line) <= 200 or len(line.split()) < 6:
                continue
            if sum(c.isalpha() or c.isspace() for c in line) >= 0.9 * len(line):
                lines.add(line)
    return sorted(lines)


@dataclass
class LineSplits:
    """The experiment's text: ``(lines, labels)`` pairs, labels indexing the family tuples."""

    pretrain: tuple[list[str], list[int]]
    train: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]
    ood: list[str]
    pretrain_families: tuple[str, ...]
    finetune_families: tuple[str, ...]


def _shuffled(lines: Sequence[str], seed: int, family: str) -> list[str]:
    shuffled = list(lines)
    random.Random(f"{seed}:{family}").shuffle(shuffled)
    return shuffled


def _take(lines: list[str], count: int, family: str) -> list[str]:
    """The first ``count`` of ``lines``, removed from it."""
    if len(lines) < count:
        raise ValueError(f"{family} has too few usable lines: {count} more requested, {len(lines)} left.")
    taken = lines[:count]
    del lines[:count]
    return taken


def build_splits(
    seed: int = 0,
    pretrain_per_family: int = 300,
    train_per_family: int = 300,
    test_per_family: int = 200,
    num_ood: int = 1000,
    pretrain_families: Sequence[str] = PRETRAIN_FAMILIES,
    finetune_families: Sequence[str] = FINETUNE_FAMILIES,
    disjoint: bool = False,
) -> LineSplits:
    """Pretraining, fine-tuning train/test and OOD lines, deterministic for ``seed``.

    The pretraining task classifies lines over ``pretrain_families`` and (unless ``disjoint``) the
    ``finetune_families`` too, with their own lines; the fine-tuning task classifies other lines of
    the ``finetune_families`` (a new head). Lines found in more than one package are dropped, so no
    line has two labels; pretraining, train, test and OOD lines are disjoint; every package
    contributes the same number of lines to each set.
    """
    if set(pretrain_families) & set(finetune_families):
        raise ValueError("pretrain_families are the packages seen in pretraining only: no finetune_families.")
    classes = tuple(pretrain_families) + (() if disjoint else tuple(finetune_families))
    by_family = {family: family_lines(family) for family in [*pretrain_families, *finetune_families]}
    seen = Counter(line for lines in by_family.values() for line in lines)
    pools = {f: _shuffled([s for s in lines if seen[s] == 1], seed, f) for f, lines in by_family.items()}
    train: tuple[list[str], list[int]] = ([], [])
    test: tuple[list[str], list[int]] = ([], [])
    pretrain: tuple[list[str], list[int]] = ([], [])
    for label, family in enumerate(finetune_families):
        for (texts, labels), count in ((test, test_per_family), (train, train_per_family)):
            texts.extend(_take(pools[family], count, family))
            labels.extend([label] * count)
    for label, family in enumerate(classes):
        pretrain[0].extend(_take(pools[family], pretrain_per_family, family))
        pretrain[1].extend([label] * pretrain_per_family)
    prose = _shuffled([line for line in prose_lines() if line not in seen], seed, "prose")
    return LineSplits(
        pretrain, train, test, _take(prose, num_ood, "prose"), classes, tuple(finetune_families)
    )


# ---------------------------------------------------------------------------------------- tokenizer
class CodeTokenizer:
    """A word-level tokenizer with a character fallback, built from training text (nothing downloaded).

    Text is cut into pieces (runs of letters, runs of digits, single other characters). The
    vocabulary holds the special tokens, every character of the training text and the most frequent
    pieces (seen at least twice, ties broken alphabetically); a piece outside it is spelt character
    by character, and an unseen character is ``[UNK]``. Encodings start with ``[CLS]`` and end with
    ``[SEP]``; ``[PAD]`` is id 0.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"the vocabulary must start with {SPECIAL_TOKENS}.")
        self.vocab = list(vocab)
        self.ids = {token: i for i, token in enumerate(self.vocab)}

    @classmethod
    def fit(cls, texts: Sequence[str], vocab_size: int = 4000) -> CodeTokenizer:
        """Build the vocabulary (at most ``vocab_size`` tokens, characters included) from ``texts``."""
        pieces = Counter(piece for text in texts for piece in _PIECES.findall(text))
        chars = sorted({char for text in texts for char in text if not char.isspace()})
        words = sorted((p for p, n in pieces.items() if n >= 2 and len(p) > 1), key=lambda p: (-pieces[p], p))
        room = max(0, vocab_size - len(SPECIAL_TOKENS) - len(chars))
        return cls([*SPECIAL_TOKENS, *chars, *words[:room]])

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text`` (no special tokens)."""
        tokens: list[str] = []
        for piece in _PIECES.findall(text):
            if piece in self.ids:
                tokens.append(piece)
            else:
                tokens.extend(char if char in self.ids else "[UNK]" for char in piece)
        return tokens

    def encode(self, texts: Sequence[str], max_length: int = 64) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask`` ``[N, L]`` (``L`` the longest, at most ``max_length``)."""
        rows = [["[CLS]", *self.tokenize(text)[: max_length - 2], "[SEP]"] for text in texts]
        width = max(len(row) for row in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor([self.ids[token] for token in row])
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------- model
def build_model(
    vocab_size: int,
    num_labels: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int = 64,
    dropout: float = 0.1,
) -> nn.Module:
    """A small ``BertForSequenceClassification`` built from a config (random weights, no download)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_length,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(config)


def add_lora(model: nn.Module, rank: int = 16, alpha: float = 16.0) -> nn.Module:
    """``model`` wrapped by peft: LoRA on the attention ``query``/``value``, ``classifier`` trained in full."""
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["query", "value"],
        lora_dropout=0.0,
        modules_to_save=["classifier"],
    )
    with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config)


class SequenceClassifier(L.LightningModule):
    """A Hugging Face sequence classifier as a LightningModule: ``forward(**batch)`` returns the logits.

    Trains what has ``requires_grad`` with Adam (``lr``, ``weight_decay``) on the cross-entropy of
    mapping batches (``input_ids``, ``attention_mask``, ``labels``).
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


# ---------------------------------------------------------------------------------------- training
@dataclass
class Encoded:
    """The tokenized splits (``input_ids``/``attention_mask`` dicts) and their labels."""

    pretrain: dict[str, Tensor]
    pretrain_labels: Tensor
    train: dict[str, Tensor]
    train_labels: Tensor
    test: dict[str, Tensor]
    test_labels: Tensor
    ood: dict[str, Tensor]
    vocab_size: int


def encode_splits(splits: LineSplits, vocab_size: int = 4000, max_length: int = 64) -> Encoded:
    """Build the tokenizer from the training lines (pretraining and fine-tuning) and encode every split."""
    tokenizer = CodeTokenizer.fit([*splits.pretrain[0], *splits.train[0]], vocab_size)

    def enc(texts: Sequence[str]) -> dict[str, Tensor]:
        return tokenizer.encode(texts, max_length)

    return Encoded(
        pretrain=enc(splits.pretrain[0]),
        pretrain_labels=torch.tensor(splits.pretrain[1]),
        train=enc(splits.train[0]),
        train_labels=torch.tensor(splits.train[1]),
        test=enc(splits.test[0]),
        test_labels=torch.tensor(splits.test[1]),
        ood=enc(splits.ood),
        vocab_size=len(tokenizer),
    )


def _trim(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the padding columns that no row of the batch needs."""
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}


def _collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return _trim({key: torch.stack([item[key] for item in items]) for key in items[0]})


def make_loader(
    inputs: dict[str, Tensor], labels: Tensor, batch_size: int, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """Mapping batches (``input_ids``, ``attention_mask``, ``labels``), padding trimmed per batch."""
    items = [{**{k: v[i] for k, v in inputs.items()}, "labels": labels[i]} for i in range(len(labels))]
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=_collate, generator=generator)


def _model_kwargs(args: argparse.Namespace, data: Encoded) -> dict[str, int]:
    return {
        "vocab_size": data.vocab_size,
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "max_length": args.max_length,
    }


def pretrain(args: argparse.Namespace, data: Encoded, seed: int) -> dict[str, Tensor]:
    """Train a whole model on the pretraining families; returns its weights without the classifier."""
    L.seed_everything(seed, verbose=False)
    net = build_model(num_labels=int(data.pretrain_labels.max()) + 1, **_model_kwargs(args, data))
    loader = make_loader(data.pretrain, data.pretrain_labels, args.batch_size, seed=seed)
    quiet_trainer(args.pretrain_epochs, validate=False).fit(
        SequenceClassifier(net, lr=args.pretrain_lr), loader
    )
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith("classifier.")}


def _snapshot_steps(args: argparse.Namespace, loader: DataLoader) -> int:
    return max(1, len(loader) // args.snapshots_per_epoch)


def finetune_run(
    args: argparse.Namespace, data: Encoded, base: dict[str, Tensor], seed: int
) -> tuple[SequenceClassifier, SWAGPosterior]:
    """LoRA fine-tuning from the pretrained ``base``, collecting SWAG over the adapters and the head.

    ``--finetune-epochs`` epochs, then ``--collect-epochs`` at the same constant learning rate with
    ``--snapshots-per-epoch`` snapshots each. Returns the final model and the posterior.
    """
    L.seed_everything(seed, verbose=False)
    net = build_model(num_labels=int(data.train_labels.max()) + 1, **_model_kwargs(args, data))
    missing, unexpected = net.load_state_dict(base, strict=False)
    if unexpected or any(not name.startswith("classifier.") for name in missing):
        raise RuntimeError(f"pretrained weights do not fit: missing {missing}, unexpected {unexpected}")
    module = SequenceClassifier(add_lora(net, args.rank, args.lora_alpha), lr=args.lr)
    loader = make_loader(data.train, data.train_labels, args.batch_size, seed=seed)
    swag = SWAGCallback(
        start_epoch=args.finetune_epochs,
        every_n_steps=_snapshot_steps(args, loader),
        max_rank=args.max_rank,
        include="lora",
    )
    quiet_trainer(args.finetune_epochs + args.collect_epochs, [swag], validate=False).fit(module, loader)
    return module.eval(), swag.posterior


def head_run(
    args: argparse.Namespace, data: Encoded, model: SequenceClassifier, seed: int
) -> tuple[SequenceClassifier, SWAGPosterior]:
    """A copy of ``model`` whose classifier head alone trains ``--collect-epochs`` more epochs at the
    same learning rate while SWAG collects over the head (last-layer SWAG)."""
    L.seed_everything(seed, verbose=False)
    head_model = copy.deepcopy(model).train()
    for name, param in head_model.named_parameters():
        param.requires_grad_(fnmatch.fnmatchcase(name, HEAD_PATTERN))
    loader = make_loader(data.train, data.train_labels, args.batch_size, seed=seed)
    swag = SWAGCallback(
        every_n_steps=_snapshot_steps(args, loader), max_rank=args.max_rank, include=[HEAD_PATTERN]
    )
    quiet_trainer(args.collect_epochs, [swag], validate=False).fit(head_model, loader)
    return head_model.eval(), swag.posterior


# ---------------------------------------------------------------------------------------- evaluation
Predict = Callable[[dict[str, Tensor]], dict[str, Tensor]]


@torch.no_grad()
def predict_probs(predict: Predict, inputs: dict[str, Tensor], batch_size: int = 256) -> Tensor:
    """Class probabilities ``[N, C]`` of a method (``predict(batch)["mean"]``), batch by batch."""
    size = len(inputs["input_ids"])
    parts = [
        predict(_trim({k: v[start : start + batch_size] for k, v in inputs.items()}))["mean"]
        for start in range(0, size, batch_size)
    ]
    return torch.cat(parts).float()


def plain_predict(model: nn.Module) -> Predict:
    """The model's own softmax (no posterior), in eval mode."""
    model.eval()
    return lambda batch: {"mean": torch.softmax(model(**batch), dim=-1)}


def method_predictors(
    args: argparse.Namespace,
    runs: list[tuple[SequenceClassifier, SWAGPosterior]],
    head: tuple[SequenceClassifier, SWAGPosterior],
    seed: int,
) -> dict[str, Predict]:
    """The five methods over the first run's model (MultiSWAG: every run's posterior)."""
    model, posterior = runs[0]
    common: dict[str, Any] = {"task": "classification", "seed": seed}
    samples = {"num_samples": args.num_samples, "scale": args.scale}
    methods: dict[str, Predict] = {
        "lora": plain_predict(model),
        "swa": SWAGModule(model, posterior, num_samples=1, scale=0.0, **common),
        "swag": SWAGModule(model, posterior, **samples, **common),
        "multiswag": SWAGModule(model, [post for _, post in runs], **samples, **common),
        "last_layer_linearized": SWAGModule(
            head[0], head[1], predictive="linearized", scale=args.scale, **common
        ),
    }
    for method in methods.values():
        if isinstance(method, SWAGModule):
            method.eval()
    return methods


def evaluate(probs: Tensor, targets: Tensor, ood_probs: Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE (``lightning_swag.metrics``) and the OOD AUROC of the predictive entropy."""
    row = metrics.classification_metrics(probs, targets)
    in_entropy, ood_entropy = metrics.predictive_entropy(probs), metrics.predictive_entropy(ood_probs)
    auroc = float(metrics.ood_auroc(in_entropy, ood_entropy))
    return {"accuracy": row["accuracy"], "nll": row["nll"], "ece": row["ece"], "auroc": auroc}


@dataclass
class SeedResult:
    """One seed's metrics, test/OOD probabilities, runs and last-layer model and posterior."""

    rows: dict[str, dict[str, float]]
    probs: dict[str, tuple[Tensor, Tensor]]
    runs: list[tuple[SequenceClassifier, SWAGPosterior]]
    head: tuple[SequenceClassifier, SWAGPosterior]
    seconds: float


def run_seed(args: argparse.Namespace, data: Encoded, seed: int) -> SeedResult:
    """Pretrain, fine-tune ``--runs`` times with SWAG, collect the head posterior, evaluate every method."""
    start = time.perf_counter()
    base = pretrain(args, data, seed)
    runs = [finetune_run(args, data, base, 1000 * seed + run + 1) for run in range(args.runs)]
    head = head_run(args, data, runs[0][0], 1000 * seed + 999)
    rows, probs = {}, {}
    for name, predict in method_predictors(args, runs, head, seed).items():
        probs[name] = (predict_probs(predict, data.test), predict_probs(predict, data.ood))
        rows[name] = evaluate(probs[name][0], data.test_labels, probs[name][1])
    return SeedResult(rows, probs, runs, head, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------- report
def summarize(per_seed: dict[int, dict[str, dict[str, float]]]) -> tuple[dict, dict]:
    """Mean and (sample) standard deviation over seeds of every method's metrics (std 0 for one seed)."""
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for method in METHODS:
        values = {key: [rows[method][key] for rows in per_seed.values()] for key in METRICS}
        mean[method] = {key: statistics.fmean(v) for key, v in values.items()}
        std[method] = {key: statistics.stdev(v) if len(v) > 1 else 0.0 for key, v in values.items()}
    return mean, std


def markdown_table(mean: dict, std: dict, seeds: Sequence[int]) -> str:
    """The methods' metrics as a markdown table (mean ± std over ``seeds``)."""
    lines = [
        f"| method ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}) | accuracy | NLL | ECE | OOD AUROC |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        m, s = mean[method], std[method]
        lines.append(
            f"| {method} | {100 * m['accuracy']:.2f} ± {100 * s['accuracy']:.2f}% "
            f"| {m['nll']:.4f} ± {s['nll']:.4f} | {100 * m['ece']:.2f} ± {100 * s['ece']:.2f}% "
            f"| {m['auroc']:.4f} ± {s['auroc']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def save_reliability(result: SeedResult, targets: Tensor, path: Path) -> None:
    """Reliability diagrams of every method on the in-distribution test lines (one seed)."""
    curves = {name: metrics.reliability_curve(probs[0], targets) for name, probs in result.probs.items()}
    ece = {name: row["ece"] for name, row in result.rows.items()}
    save_figure(plot_reliability_diagrams(curves, ece), path)


def _setting(args: argparse.Namespace, splits: LineSplits, data: Encoded, result: SeedResult) -> str:
    posterior = result.runs[0][1]
    return (
        f"pretrain {len(splits.pretrain[0])} lines of {', '.join(splits.pretrain_families)} for "
        f"{args.pretrain_epochs} epochs; LoRA rank {args.rank} fine-tune on {len(splits.train[0])} lines of "
        f"{', '.join(splits.finetune_families)}: {args.finetune_epochs} + {args.collect_epochs} epochs Adam "
        f"lr {args.lr}, {posterior.num_snapshots} snapshots, rank {posterior.rank}, {args.num_samples} "
        f"samples, scale {args.scale}; {len(splits.test[0])} test lines, {len(splits.ood)} OOD prose lines, "
        f"vocabulary {data.vocab_size}"
    )


def write_results(out: Path, results: dict[str, Any], markdown: str) -> None:
    """``metrics.json`` (the JSON part of ``results``) and ``results.md``."""
    saved = {key: value for key, value in results.items() if key != "artifacts"}
    (out / "metrics.json").write_text(json.dumps(saved, indent=2))
    (out / "results.md").write_text(markdown)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole experiment; writes ``metrics.json``, ``results.md`` and ``reliability.png`` to ``--out``.

    Returns the content of ``metrics.json`` (``methods``: the mean over seeds; ``std``, ``per_seed``,
    ``setting``, ``config``, ``machine``, ``seconds``) plus ``artifacts``, not saved: the first seed's
    :class:`SeedResult` and the :class:`Encoded` data, for checks.
    """
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = build_splits(
        args.data_seed,
        args.pretrain_per_family,
        args.train_per_family,
        args.test_per_family,
        args.num_ood,
        disjoint=args.disjoint,
    )
    data = encode_splits(splits, args.vocab_size, args.max_length)
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(args, data, seed)
        done = ", ".join(f"{name} {100 * row['accuracy']:.1f}%" for name, row in results[seed].rows.items())
        print(f"seed {seed} ({results[seed].seconds:.0f} s): accuracy {done}", flush=True)
    mean, std = summarize({seed: r.rows for seed, r in results.items()})
    first = results[args.seeds[0]]
    save_reliability(first, data.test_labels, out / "reliability.png")
    setting = _setting(args, splits, data, first)
    seconds = time.perf_counter() - start
    markdown = (
        f"{markdown_table(mean, std, args.seeds)}\n{setting}\n\n{machine_description()}; {seconds:.0f} s\n"
    )
    summary = {
        "methods": mean,
        "std": std,
        "per_seed": {str(seed): r.rows for seed, r in results.items()},
        "setting": setting,
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "machine": machine_description(),
        "seconds": {"total": seconds, **{f"seed_{s}": r.seconds for s, r in results.items()}},
    }
    write_results(out, summary, markdown)
    print(markdown)
    return {**summary, "artifacts": {"seed_result": first, "data": data}}


def _seeds(text: str) -> list[int]:
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


_FAST = {
    "pretrain_per_family": 300,
    "train_per_family": 250,
    "test_per_family": 150,
    "num_ood": 600,
    "pretrain_epochs": 4,
    "finetune_epochs": 3,
    "collect_epochs": 4,
    "snapshots_per_epoch": 3,
    "max_rank": 12,
    "num_samples": 10,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``--fast`` replaces the sizes and epochs by :data:`_FAST` and keeps the first seed)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--out", default="outputs/lora", help="folder for metrics.json, results.md and the figure")
    add("--fast", action="store_true", help="one seed, small data, few epochs (about 2 minutes on 2 CPUs)")
    add("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (mean ± std over them)")
    add("--data-seed", type=int, default=0, help="the seed of the train/test/OOD split")
    add("--disjoint", action="store_true", help="pretrain on the six other packages only (see above)")
    add("--runs", type=int, default=3, help="independent fine-tuning runs for MultiSWAG")
    for name, default in (("pretrain-per-family", 600), ("train-per-family", 500), ("test-per-family", 300)):
        add(f"--{name}", type=int, default=default, help="lines per package")
    add("--num-ood", type=int, default=1500, help="prose lines (out-of-distribution)")
    add("--vocab-size", type=int, default=4000)
    add("--max-length", type=int, default=64, help="tokens per line, [CLS] and [SEP] included")
    add("--hidden-size", type=int, default=64)
    add("--layers", type=int, default=2)
    add("--heads", type=int, default=4)
    add("--batch-size", type=int, default=32)
    add("--pretrain-epochs", type=int, default=5)
    add("--pretrain-lr", type=float, default=1e-3)
    add("--rank", type=int, default=16, help="LoRA rank")
    add("--lora-alpha", type=float, default=32.0)
    add("--lr", type=float, default=3e-3, help="Adam learning rate of fine-tuning and collection (constant)")
    add("--finetune-epochs", type=int, default=4)
    add("--collect-epochs", type=int, default=6)
    add("--snapshots-per-epoch", type=int, default=2)
    add("--max-rank", type=int, default=16, help="SWAG deviation columns")
    add("--num-samples", type=int, default=20, help="weight samples per posterior")
    add("--scale", type=float, default=0.5, help="SWAG covariance scale")
    args = parser.parse_args(argv)
    if args.fast:
        for key, value in _FAST.items():
            setattr(args, key, value)
        args.seeds = args.seeds[:1]
    if args.runs < 1 or args.snapshots_per_epoch < 1 or args.collect_epochs < 1:
        parser.error("--runs, --snapshots-per-epoch and --collect-epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python examples/lora.py [options]``), without Lightning's banners."""
    with quiet_lightning(examples=True):
        run(parse_args(argv))


if __name__ == "__main__":
    main()
