"""BMA over LoRA adapter samples against the plain peft model, on a small config-built BERT classifier.

Every time is the median of ``--repeats`` interleaved calls (one warm-up call each first, the order
of the contenders rotated at every repetition) in one run, on ``--threads`` torch threads; the first
line describes the machine. The model: ``BertForSequenceClassification`` built from a config (no
download; ``--layers`` 4, ``--hidden`` 128, 3 labels) with a peft LoRA adapter (rank ``--lora-r`` on
``query`` and ``value``), on a batch of ``--batch`` 32 sequences of ``--seq`` 64 tokens. The posterior
(rank ``K`` = ``--rank``) comes from ``--snapshots`` points of a seeded random walk of the adapter
weights.

1. **BMA over S adapter samples** (``BMA(model, posterior, num_samples=S, task="classification",
   seed=0)``, S in ``--samples``; adapters on every layer and ``modules_to_save=["classifier"]``)
   against the floor: S forwards of the plain peft model under the same weight samples, written in by
   hand (``torch.func.functional_call``, or copied into the parameters), softmax-averaged; the floor
   is the faster of the two. Goal ≤ 1.1×. Steady state (the module has run before) and first batch (a
   freshly built ``BMA``, its build not timed; the floor then also draws the S samples by hand,
   ``mean + √scale·(√var ⊙ z₁ + Fᵀz₂)``). With the largest |Δ| between the BMA's probabilities and
   the hand loop's on the samples ``BMA.iter_weight_samples()`` yields.
2. **LoRA only in the last block** (``layers_to_transform=[layers - 1]``, no ``modules_to_save``):
   the split path (``split_forward=True``) against S full forwards and against the floor "one
   prefix forward (embeddings and the frozen blocks, once) + S suffix forwards (the last block, the
   pooler and the classifier)", written by hand. The split's plan is printed, and its refusal message
   verbatim when it refuses the model.
3. **Memory**: ``posterior.nbytes`` against the adapter weights' bytes, with float32 moments
   (expected ``K + 3`` copies: the mean, the sum of squared deviations, the scratch vector and K
   deviation rows) and with the default float64 moments (the three moment vectors twice as wide:
   ``K + 6`` float32 copies), before and after a BMA has run (sampling in float32 caches a float32
   mean and standard deviation: 2 more copies).

Usage::

    python benchmarks/lora.py [--threads 1] [--samples 10,30] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from torch import Tensor, nn
from torch.func import functional_call

from lightning_swag import BMA, SWAGPosterior
from lightning_swag.experiments.machine import machine_description

SCALE, LABELS, VOCAB = 0.5, 3, 1000
GOAL = 1.1


# ---------------------------------------------------------------------- model, posterior, data
def lora_bert(args: argparse.Namespace, last_block_only: bool = False) -> nn.Module:
    """The config-built BERT classifier with a LoRA adapter (every layer and a trained classifier copy,
    or ``last_block_only``: the last layer's attention and nothing else), in eval mode."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(args.seq, 8),
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.1,  # logits away from uniform, so that the samples' spread shows
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config)
    options: dict[str, Any] = {"r": args.lora_r, "lora_alpha": 2 * args.lora_r, "lora_dropout": 0.0}
    if last_block_only:
        options["layers_to_transform"] = [args.layers - 1]
    else:
        options["modules_to_save"] = ["classifier"]
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["query", "value"], **options))
    with torch.no_grad():  # peft starts lora_B at zero: trained adapters are not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def walk_posterior(model: nn.Module, rank: int, snapshots: int, moment_dtype: torch.dtype) -> SWAGPosterior:
    """A posterior over the adapters (``include="lora"``) from a seeded random walk of them (steps of
    5% of each tensor's RMS)."""
    post = SWAGPosterior.from_model(model, max_rank=rank, include="lora", moment_dtype=moment_dtype)
    walker = copy.deepcopy(model)
    tracked = set(post.param_shapes)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(snapshots):
            for name, p in walker.named_parameters():
                if name in tracked:
                    step = 0.05 * float(p.square().mean().sqrt())
                    p.add_(step * torch.randn(p.shape, generator=g))
            post.collect(walker)
    return post


def batch(args: argparse.Namespace) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (args.batch, args.seq), generator=g)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    mask[: args.batch // 2, args.seq * 3 // 4 :] = 0  # half the rows padded
    return {"input_ids": ids, "attention_mask": mask}


def adapter_bytes(model: nn.Module, post: SWAGPosterior) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() * params[n].element_size() for n in post.param_shapes)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------- hand-written floors
def samples_of(bma: BMA) -> list[dict[str, Tensor]]:
    """The BMA's own weight samples, one ``{name: tensor}`` per sample."""
    out: list[dict[str, Tensor]] = []
    for chunk in bma.iter_weight_samples():
        count = next(iter(chunk.values())).shape[0]
        out += [{name: value[i] for name, value in chunk.items()} for i in range(count)]
    return out


def hand_draw(post: SWAGPosterior, count: int, seed: int) -> list[dict[str, Tensor]]:
    """``count`` samples ``mean + √scale·(√var ⊙ z₁ + Fᵀz₂)`` in float32, by hand, split by name."""
    variance, factor = post.covariance_factors()
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(count, post.num_params, generator=g).mul_(variance.float().sqrt())
    if factor is not None:
        draws.addmm_(torch.randn(count, factor.shape[0], generator=g), factor.float())
    draws.mul_(math.sqrt(SCALE)).add_(post.mean.float())
    return [dict(zip(post.param_shapes, split_like(row, post), strict=True)) for row in draws]


def split_like(flat: Tensor, post: SWAGPosterior) -> list[Tensor]:
    return [
        part.view(shape)
        for part, shape in zip(flat.split(post.param_numels), post.param_shapes.values(), strict=True)
    ]


def loop_functional(model: nn.Module, x: dict[str, Tensor], samples: list[dict[str, Tensor]]) -> Tensor:
    """The softmax average of one forward per sample, the sample passed by ``functional_call``."""
    total = torch.zeros(())
    for weights in samples:
        total = total + functional_call(model, weights, (), x).logits.softmax(-1)
    return total / len(samples)


def loop_copy(model: nn.Module, x: dict[str, Tensor], samples: list[dict[str, Tensor]]) -> Tensor:
    """The same, each sample copied into the parameters (the trained values put back afterwards)."""
    params = dict(model.named_parameters())
    kept = {name: params[name].detach().clone() for name in samples[0]}
    total = torch.zeros(())
    try:
        for weights in samples:
            for name, value in weights.items():
                params[name].data.copy_(value)
            total = total + model(**x).logits.softmax(-1)
    finally:
        for name, value in kept.items():
            params[name].data.copy_(value)
    return total / len(samples)


class _Stop(Exception):  # noqa: N818 - stops the forward pass once the prefix has run
    pass


class PrefixSuffix:
    """The BERT classifier cut before its last layer: the prefix (embeddings, the masks, the frozen
    layers) runs once and its output is captured at the last layer's call; the suffix (the last layer
    under a sample, the pooler, the classifier) runs per sample."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        self.model = model
        bert_model = model.base_model.model
        self.layer_name = f"base_model.model.bert.encoder.layer.{layers - 1}"
        self.layer = model.get_submodule(self.layer_name)
        self.pooler, self.classifier = bert_model.bert.pooler, bert_model.classifier

    def prefix(self, x: dict[str, Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append((args, kwargs))
            raise _Stop

        handle = self.layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**x)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    def suffix(self, arguments: tuple[tuple[Any, ...], dict[str, Any]], weights: dict[str, Tensor]) -> Tensor:
        start = len(self.layer_name) + 1
        relative = {name[start:]: value for name, value in weights.items()}
        hidden = functional_call(self.layer, relative, *arguments)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.classifier(self.pooler(hidden))

    def __call__(self, x: dict[str, Tensor], samples: list[dict[str, Tensor]]) -> Tensor:
        arguments = self.prefix(x)
        total = torch.zeros(())
        for weights in samples:
            total = total + self.suffix(arguments, weights).softmax(-1)
        return total / len(samples)


# ---------------------------------------------------------------------- measuring
def median_times(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call: one warm-up call each, then ``repeats`` rounds with the order rotated
    every round; a contender returning a float reports its own seconds (a first batch without its
    setup)."""
    names = list(contenders)
    for name in names:
        contenders[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            own = contenders[name]()
            seconds[name].append(own if isinstance(own, float) else time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def first_batch(build: Callable[[], BMA], x: dict[str, Tensor]) -> Callable[[], float]:
    def run() -> float:
        bma = build()
        start = time.perf_counter()
        bma(x)
        return time.perf_counter() - start

    return run


def bma_for(model: nn.Module, post: SWAGPosterior, samples: int, **kwargs: Any) -> BMA:
    return BMA(model, post, num_samples=samples, task="classification", seed=0, scale=SCALE, **kwargs)


# ---------------------------------------------------------------------- 1. BMA against the floor
def all_adapters(args: argparse.Namespace) -> dict[str, Any]:
    model = lora_bert(args)
    post = walk_posterior(model, args.rank, args.snapshots, torch.float64)
    x = batch(args)
    results: dict[str, Any] = {}
    for s in args.samples:
        with torch.no_grad(), quiet():
            bma = bma_for(model, post, s)
            no_split = bma_for(model, post, s, split_forward=False)
            bma(x)
            drawn = samples_of(bma)
            mean = bma(x)["mean"]
            error = float((mean - loop_functional(model, x, drawn)).abs().max())
            spread = float((functional_call(model, drawn[0], (), x).logits.softmax(-1) - mean).abs().max())
            steady = median_times(
                {
                    "BMA": lambda b=bma: b(x),
                    "BMA, split_forward=False": lambda b=no_split: b(x),
                    "floor: functional_call": lambda d=drawn: loop_functional(model, x, d),
                    "floor: copy into parameters": lambda d=drawn: loop_copy(model, x, d),
                },
                args.repeats,
            )
            fastest = min(("functional_call", "copy into parameters"), key=lambda k: steady[f"floor: {k}"])
            hand = loop_functional if fastest == "functional_call" else loop_copy
            first = median_times(
                {
                    "BMA": first_batch(lambda s=s: bma_for(model, post, s), x),
                    "BMA, split_forward=False": first_batch(
                        lambda s=s: bma_for(model, post, s, split_forward=False), x
                    ),
                    "floor + hand draw": lambda s=s, h=hand: h(model, x, hand_draw(post, s, seed=1)),
                },
                args.repeats,
            )
        results[s] = {
            "steady": steady,
            "first": first,
            "floor": fastest,
            "error": error,
            "spread": spread,
            "plan": str(bma.execution_plan),
        }
    return results


# ---------------------------------------------------------------------- 2. LoRA in the last block only
def last_block(args: argparse.Namespace) -> dict[str, Any]:
    model = lora_bert(args, last_block_only=True)
    post = walk_posterior(model, args.rank, args.snapshots, torch.float64)
    x = batch(args)
    cut = PrefixSuffix(model, args.layers)
    results: dict[str, Any] = {"tracked": list(post.param_shapes)}
    for s in args.samples:
        with torch.no_grad(), quiet():
            split = bma_for(model, post, s)
            full = bma_for(model, post, s, split_forward=False)
            split(x)
            drawn = samples_of(split)
            ours = split(x)["mean"]
            errors = {
                "split vs full BMA": float((ours - full(x)["mean"]).abs().max()),
                "split vs S full forwards (hand)": float(
                    (ours - loop_functional(model, x, drawn)).abs().max()
                ),
                "split vs prefix once + S suffixes (hand)": float((ours - cut(x, drawn)).abs().max()),
            }
            times = median_times(
                {
                    "BMA, split_forward=True": lambda b=split: b(x),
                    "BMA, split_forward=False": lambda b=full: b(x),
                    "floor: S full forwards": lambda d=drawn: loop_functional(model, x, d),
                    "floor: prefix once + S suffixes": lambda d=drawn: cut(x, d),
                    "prefix alone": lambda: cut.prefix(x),
                },
                args.repeats,
            )
        plan = split.execution_plan
        assert plan is not None
        results[s] = {
            "times": times,
            "errors": errors,
            "split": plan.split,
            "split_refused": plan.split_refused,
            "plan": str(plan),
        }
    return results


# ---------------------------------------------------------------------- 3. memory
def memory(args: argparse.Namespace) -> dict[str, Any]:
    model = lora_bert(args)
    x = batch(args)
    rows = {}
    for label, dtype, expected in (
        ("float32 moments", torch.float32, args.rank + 3),
        ("float64 moments (default)", torch.float64, args.rank + 6),
    ):
        post = walk_posterior(model, args.rank, args.snapshots, dtype)
        weights = adapter_bytes(model, post)
        before = post.nbytes
        with torch.no_grad(), quiet():
            bma_for(model, post, min(args.samples))(x)
        rows[label] = {
            "adapter_bytes": weights,
            "adapter_params": post.num_params,
            "posterior_bytes": before,
            "multiple": before / weights,
            "expected": expected,
            "after_bma_bytes": post.nbytes,
            "after_bma_multiple": post.nbytes / weights,
        }
    return rows


# ---------------------------------------------------------------------- tables
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _verdict(ratio: float, goal: float = GOAL) -> str:
    return f"{ratio:.3f}× (goal ≤ {goal:g}×: {'met' if ratio <= goal else 'MISSED'})"


def all_adapters_table(results: dict[int, Any]) -> str:
    lines = [
        "| S | contender | steady, ms | × floor | first batch, ms | × first-batch floor |",
        "|---|---|---|---|---|---|",
    ]
    for s, res in results.items():
        steady, first = res["steady"], res["first"]
        floor = steady[f"floor: {res['floor']}"]
        first_floor = first["floor + hand draw"]
        for name, seconds in steady.items():
            one = first.get(name)
            ratio = "(floor)" if name == f"floor: {res['floor']}" else f"{seconds / floor:.2f}×"
            first_cells = f"{_ms(one)} | {one / first_floor:.2f}×" if one is not None else " | "
            lines.append(f"| {s} | {name} | {_ms(seconds)} | {ratio} | {first_cells} |")
        lines.append(f"| {s} | floor + hand draw | | | {_ms(first_floor)} | (floor) |")
    notes = [
        "",
        "Floor: S forwards of the plain peft model under the same samples, the faster of functional_call and "
        "copying into the parameters, softmax-averaged; first batch: a freshly built BMA (build not timed) "
        "against the floor plus drawing the S samples by hand.",
        *(
            f"S={s}: BMA vs hand loop on the same samples (iter_weight_samples), largest |Δ probability| = "
            f"{r['error']:.2g} (one sample's probabilities differ from the mean by up to {r['spread']:.2g}); "
            f"plan: {r['plan']}"
            for s, r in results.items()
        ),
    ]
    return "\n".join(lines + notes)


def last_block_table(results: dict[Any, Any]) -> str:
    lines = [
        "| S | contender | ms | × S full forwards | × prefix once + S suffixes |",
        "|---|---|---|---|---|",
    ]
    samples = [k for k in results if k != "tracked"]
    for s in samples:
        t = results[s]["times"]
        full, floor = t["floor: S full forwards"], t["floor: prefix once + S suffixes"]
        for name, seconds in t.items():
            lines.append(
                f"| {s} | {name} | {_ms(seconds)} | {seconds / full:.2f}× | {seconds / floor:.2f}× |"
            )
    notes = ["", f"Tracked: {len(results['tracked'])} tensors, all in the last layer."]
    for s in samples:
        r = results[s]
        state = (
            f"the split runs {r['split']!r}"
            if r["split"]
            else f"the split path refused the model: {r['split_refused']!r}"
        )
        errors = "; ".join(f"{k}: {v:.2g}" for k, v in r["errors"].items())
        notes.append(f"S={s}: {state}. Largest |Δ probability|: {errors}")
    return "\n".join(lines + notes)


def memory_table(rows: dict[str, Any], rank: int) -> str:
    lines = [
        "| posterior | adapter weights, bytes | posterior.nbytes | multiple | expected | after a BMA ran | multiple |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['adapter_bytes']:,} | {r['posterior_bytes']:,} | {r['multiple']:.3f}× | "
            f"{r['expected']}× | {r['after_bma_bytes']:,} | {r['after_bma_multiple']:.3f}× |"
        )
    p = next(iter(rows.values()))["adapter_params"]
    lines += [
        "",
        f"K = {rank}, {p:,} adapter parameters (float32). Expected: K + 3 vectors of P elements (mean, sum of "
        "squared deviations, scratch; K deviation rows); in float32-weight copies K + 3 with float32 moments, "
        "K + 6 with float64 moments. After a BMA, float64 moments gain a cached float32 sampling mean and std (2 copies).",
    ]
    return "\n".join(lines)


def goals(first: dict[int, Any], second: dict[Any, Any], mem: dict[str, Any]) -> str:
    lines = []
    for s, res in first.items():
        steady = res["steady"]
        floor = steady[f"floor: {res['floor']}"]
        lines.append(f"* S={s}, steady state, BMA against the floor: {_verdict(steady['BMA'] / floor)}")
        lines.append(
            f"* S={s}, first batch, BMA against the floor + hand draw: "
            f"{_verdict(res['first']['BMA'] / res['first']['floor + hand draw'])}"
        )
    for s in [k for k in second if k != "tracked"]:
        t = second[s]["times"]
        ratio = t["BMA, split_forward=True"] / t["floor: prefix once + S suffixes"]
        lines.append(f"* S={s}, last block only, split path against prefix once + S suffixes: {ratio:.2f}×")
    for label, r in mem.items():
        ok = "met" if abs(r["multiple"] - r["expected"]) < 0.01 else "MISSED"
        lines.append(
            f"* memory, {label}: {r['multiple']:.3f}× the adapter weights (expected {r['expected']}×: {ok})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--samples", default="10,30", help="weight samples per BMA (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per contender")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--rank", type=int, default=20, help="SWAG rank K")
    parser.add_argument("--snapshots", type=int, default=25, help="snapshots of the random walk")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    args.samples = [int(s) for s in args.samples.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{machine_description()}; load average before: {load}", flush=True)
    print(
        f"BERT {args.layers} layers, hidden {args.hidden}, batch {args.batch}×{args.seq} tokens; LoRA r={args.lora_r} "
        f"on query/value; SWAG rank K={args.rank}, {args.snapshots} snapshots, scale={SCALE}; "
        f"repeats={args.repeats}, threads={args.threads}; peft {peft.__version__}, transformers "
        f"{transformers.__version__}",
        flush=True,
    )
    results: dict[str, Any] = {"args": vars(args)}
    results["all_adapters"] = all_adapters(args)
    print("\n## 1. BMA over adapter samples against the plain peft model\n", flush=True)
    print(all_adapters_table(results["all_adapters"]), flush=True)
    results["last_block"] = last_block(args)
    print("\n## 2. LoRA in the last block only: the split path\n", flush=True)
    print(last_block_table(results["last_block"]), flush=True)
    results["memory"] = memory(args)
    print("\n## 3. Memory: the posterior against the adapter weights\n", flush=True)
    print(memory_table(results["memory"], args.rank), flush=True)
    print("\n## Goals\n\n" + goals(results["all_adapters"], results["last_block"], results["memory"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=str, indent=1))
    return results


if __name__ == "__main__":
    main()
