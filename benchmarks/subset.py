"""Subset posteriors against the work they cannot avoid, and against laplace-torch (issues #19, #27).

Every time is the median of ``--repeats`` interleaved calls (the order of the contenders rotated at
every repetition, after two warm-up calls each) in one run, on ``--threads`` torch threads; the
first line describes the machine. Each table states the floor its ratios are taken to.

1. **A small conv net, first batch and steady state** (a conv backbone, 128 features, a 128→10
   linear head, 96 images 32×32; a rank-20 posterior over ``head.*`` from 30 snapshots). Floor: one
   deterministic forward pass of the model, the faster of channels-first and channels-last inputs.
   Steady state: the sampled BMA (30 samples, the backbone once per batch) and the linearised
   predictive of a module that has run before (goals ≤ 1.5× and ≤ 1.3×). First batch: a freshly
   built ``SWAGModule`` on one batch, all first-batch work included (the checks of the split, the
   layout and vmap/loop choices, drawing the samples; goal ≤ 1.5×). With the split path's largest
   difference from the full path (same seed) and the linearised probabilities' from the closed form
   computed here from ``post.mean``/``variance``/``deviations``.
2. **Output spaces** (a conv backbone to 512 features, a 512→C linear head, C = 10, 1,000, 3,100,
   64 images; rank 20, 30 samples). Floors in plain torch, timed beside ours: for the sampled BMA,
   one backbone forward plus 30 head matmuls (``addmm`` with samples drawn beforehand); for the
   linearised predictive, one backbone forward plus ``rank + 2`` head-sized matmuls (the mean, the
   diagonal term, one per deviation). ``link_approx="mc"`` averages the linearised outputs under the
   sampled predictive's own weight samples (exact, and for a linear head the same numbers as the
   sampled BMA), so its floor is the sampled one: the diagonal part of each sample's covariance
   needs one head-sized matmul per sample. Goals ≤ 1.3×. First batch: a fresh module against the
   floor plus, for the sampled BMA, drawing the 30 samples by hand (``mean + √scale·(√var ⊙ z₁ +
   Fᵀz₂)``).
3. **Full posterior** (an MLP 784-256-256-10, 96 inputs, rank 20): ``SWAGModule`` against the plain
   hand-written loop (``posterior.sample``, ``vector_to_parameters``, forward, softmax average; goal
   ≤ 1.0×), for one batch from the posterior (sampling included) and for a later batch.
4. **Against laplace-torch 0.3's last-layer Laplace** on the network of table 2 at each C:
   ``Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="diag" |
   "kron")`` fitted on the batch, called as ``la(x, pred_type="glm", link_approx="probit")``, which
   builds the ``[B, C, C·(F+1)]`` last-layer Jacobians. Times are per input (a batch of 64 divided by 64).
   Where a batch's Jacobians exceed ``--max-gib`` but one input's fit, it is called on one input
   (time and memory of that call, timed once after a warm-up call); where one input's do not fit,
   the row gives the size and is not run. One more row runs laplace-torch's ``functional_variance_fast`` (diag; what ``la(...)``
   does not call) with the probit by hand. Peak memory: each row in a fresh subprocess, the
   resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over the RSS
   after setup, for the first and a later batch (Linux only; "n/a" elsewhere). Without laplace-torch
   (the ``examples`` extra) its rows are skipped with a message.

Usage::

    python benchmarks/subset.py [--quick] [--threads 1] [--classes 10,1000,3100] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_swag import SWAGModule, SWAGPosterior
from lightning_swag.experiments.machine import machine_description

BATCH, NUM_SAMPLES, SCALE, RANK = 96, 30, 0.5, 20
WIDE_BATCH, WIDE_FEATURES = 64, 512
MiB = 2**20
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
LAPLACE_ROWS = ("laplace diag", "laplace kron", "laplace diag, fast variance by hand")
OURS_ROWS = ("SWAG linearised", "SWAG linearised, covariance='diagonal'", "SWAG sampled (30)")


# ---------------------------------------------------------------------- networks and posteriors
class HeadNet(nn.Module):
    """A small conv backbone (3×32×32 → ``features``) and a linear head to ``classes``."""

    def __init__(self, classes: int, features: int = 128) -> None:
        super().__init__()
        width = 16 if features <= 128 else 32
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(16 * width, features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def walk_posterior(net: nn.Module, include: list[str] | None, snapshots: int, seed: int = 0) -> SWAGPosterior:
    """A rank-20 posterior from ``snapshots`` points of a seeded random walk of the tracked weights
    (steps of 1% of each tensor's RMS)."""
    post = SWAGPosterior.from_model(net, max_rank=RANK, include=include)
    walker = copy.deepcopy(net)
    tracked = set(post.param_shapes)
    g = torch.Generator().manual_seed(seed)
    scales = {n: 0.01 * float(p.detach().square().mean().sqrt()) for n, p in walker.named_parameters()}
    for _ in range(snapshots):
        with torch.no_grad():
            for name, p in walker.named_parameters():
                if name in tracked:
                    p.add_(scales[name] * torch.randn(p.shape, generator=g))
        post.collect(walker)
    return post


def images(batch: int = BATCH, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def module_for(net: nn.Module, post: SWAGPosterior, **kwargs: Any) -> SWAGModule:
    options = {"num_samples": NUM_SAMPLES, "scale": SCALE, "seed": 0, "task": "classification"}
    return SWAGModule(net, post, **{**options, **kwargs})


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------- measuring
def median_times(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each contender: two warm-up calls each, then ``repeats`` rounds
    with the order rotated every round."""
    names = list(contenders)
    for name in names:
        contenders[name]()
        contenders[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def fresh(build: Callable[[], SWAGModule], x: Tensor) -> Callable[[], Any]:
    """A contender timing a freshly built module's first batch (the build is not timed)."""

    def first_batch() -> Any:
        module = build()
        start = time.perf_counter()
        module(x)
        return time.perf_counter() - start

    return first_batch


def first_batch_times(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Like :func:`median_times`, but a contender returning a float reports its own seconds (a first
    batch, without building the module)."""
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


def _status_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_rss_increase(fn: Callable[[], Any]) -> int | None:
    """Bytes by which the resident-set high-water mark rises over the current RSS while ``fn`` runs
    (freed heap memory is returned to the system first, ``malloc_trim``); ``None`` off Linux."""
    if not (_STATUS.is_file() and _CLEAR_REFS.exists()):
        return None
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


# ---------------------------------------------------------------------- 1. a small conv net
def closed_form_probit(net: HeadNet, post: SWAGPosterior, x: Tensor) -> Tensor:
    """The linearised probit probabilities of a last-layer posterior, from the posterior's moments."""
    with torch.no_grad():
        phi = net.body(x).double()
    classes, features = net.head.weight.shape
    split = [classes * features, classes]
    mean_w, mean_b = post.mean.double().split(split)
    var_w, var_b = post.variance.double().split(split)
    rows_w, rows_b = post.deviations.double().split(split, dim=1)
    mu = phi @ mean_w.reshape(classes, features).T + mean_b
    var = phi.square() @ var_w.reshape(classes, features).T + var_b
    columns = torch.einsum("bf,kcf->kbc", phi, rows_w.reshape(-1, classes, features)) + rows_b[:, None, :]
    var = SCALE * (var + columns.square().sum(0) / (post.rank - 1))
    return torch.softmax(mu / (1 + math.pi / 8 * var).sqrt(), dim=-1)


def small_net(repeats: int, snapshots: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = HeadNet(10).eval()
    post = walk_posterior(net, ["head.*"], snapshots)
    x = images()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    sampled, full = module_for(net, post), module_for(net, post, split_forward=False)
    lin = module_for(net, post, predictive="linearized")
    with torch.no_grad(), quiet():
        steady = median_times(
            {
                "forward": lambda: net(x),
                "forward, channels-last input": lambda: net(x_cl),
                "sampled (split)": lambda: sampled(x),
                "sampled, whole model per sample (split_forward=False)": lambda: full(x),
                "linearised": lambda: lin(x),
            },
            repeats,
        )
        first = first_batch_times(
            {
                "forward": lambda: net(x),
                "forward, channels-last input": lambda: net(x_cl),
                "sampled (split)": fresh(lambda: module_for(net, post), x),
                "linearised": fresh(lambda: module_for(net, post, predictive="linearized"), x),
            },
            repeats,
        )
        split_error = float((sampled(x)["mean"] - full(x)["mean"]).abs().max())
        closed_error = float((lin(x)["mean"].double() - closed_form_probit(net, post, x)).abs().max())
    plans = {"sampled": sampled.execution_plan, "linearised": lin.execution_plan, "full": full.execution_plan}
    return {
        "steady": steady,
        "first": first,
        "split_error": split_error,
        "closed_error": closed_error,
        "plans": plans,
    }


# ---------------------------------------------------------------------- 2. output spaces
class HandDraw:
    """Weight vectors ``mean + √scale·(√var ⊙ z₁ + Fᵀz₂)`` in float32, in plain torch: the work of
    drawing samples that cannot be avoided (the posterior's moments are read once, beforehand)."""

    def __init__(self, post: SWAGPosterior) -> None:
        variance, factor = post.covariance_factors()
        self.mean, self.std = post.mean.float(), variance.float().sqrt()
        self.factor = None if factor is None else factor.float()

    def __call__(self, count: int, generator: torch.Generator) -> Tensor:
        draws = (
            torch.randn(count, self.mean.numel(), generator=generator).mul_(self.std).mul_(math.sqrt(SCALE))
        )
        draws += self.mean
        if self.factor is not None:
            z2 = torch.randn(count, self.factor.shape[0], generator=generator)
            draws.addmm_(z2, self.factor, alpha=math.sqrt(SCALE))
        return draws


def output_space(classes: int, repeats: int, snapshots: int) -> dict[str, Any]:
    """Table 2 at ``classes``: the floors and ours, steady state and first batch."""
    torch.manual_seed(0)
    net = HeadNet(classes, WIDE_FEATURES).eval()
    post = walk_posterior(net, ["head.*"], snapshots)
    x = images(WIDE_BATCH)
    draw = HandDraw(post)
    drawn = draw(NUM_SAMPLES, torch.Generator().manual_seed(0))
    weights = drawn[:, : classes * WIDE_FEATURES].reshape(NUM_SAMPLES, classes, WIDE_FEATURES)
    biases = drawn[:, classes * WIDE_FEATURES :]
    body = net.body
    with torch.no_grad():  # the backbone's floor: the faster input layout
        layouts = {"channels-first": x, "channels-last": x.contiguous(memory_format=torch.channels_last)}
        layout_times = median_times({k: (lambda v=v: body(v)) for k, v in layouts.items()}, repeats)
    x_body = layouts[min(layout_times, key=layout_times.__getitem__)]

    def floor(matmuls: int, drawing: bool = False, average: bool = False) -> Callable[[], Any]:
        def run() -> None:
            if drawing:
                draw(NUM_SAMPLES, torch.Generator().manual_seed(1))
            phi = body(x_body)
            total = torch.zeros(())
            for i in range(matmuls):
                logits = torch.addmm(biases[i % NUM_SAMPLES], phi, weights[i % NUM_SAMPLES].T)
                if average:
                    total = total + torch.softmax(logits, dim=-1)

        return run

    sampled, lin = module_for(net, post), module_for(net, post, predictive="linearized")
    mc = module_for(net, post, predictive="linearized", link_approx="mc")
    with torch.no_grad(), quiet():
        steady = median_times(
            {
                "floor, sampled": floor(NUM_SAMPLES),
                "floor, linearised": floor(RANK + 2),
                "floor, sampled + softmax average": floor(NUM_SAMPLES, average=True),
                "sampled": lambda: sampled(x),
                "linearised": lambda: lin(x),
                "linearised, link_approx='mc'": lambda: mc(x),
            },
            repeats,
        )
        first = first_batch_times(
            {
                "floor, sampled": floor(NUM_SAMPLES, drawing=True),
                "floor, linearised": floor(RANK + 2),
                "sampled": fresh(lambda: module_for(net, post), x),
                "linearised": fresh(lambda: module_for(net, post, predictive="linearized"), x),
                "linearised, link_approx='mc'": fresh(
                    lambda: module_for(net, post, predictive="linearized", link_approx="mc"), x
                ),
            },
            max(3, repeats // 3),
        )
        mc_error = float((mc(x)["mean"] - sampled(x)["mean"]).abs().max())
    return {
        "steady": steady,
        "first": first,
        "mc_error": mc_error,
        "plan": sampled.execution_plan,
        "backbone_layout": min(layout_times, key=layout_times.__getitem__),
    }


# ---------------------------------------------------------------------- 3. full posterior vs the plain loop
def flat_samples(module: SWAGModule, net: nn.Module) -> Tensor:
    """The module's weight samples as flat vectors in ``net.parameters()`` order."""
    names = [n for n, _ in net.named_parameters()]
    parts = [
        torch.cat([c[n].reshape(c[n].shape[0], -1) for n in names], dim=1)
        for c in module.iter_weight_samples()
    ]
    return torch.cat(parts)


def full_posterior(repeats: int, snapshots: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = mlp().eval()
    post = walk_posterior(net, None, snapshots)
    x = torch.randn(BATCH, 784, generator=torch.Generator().manual_seed(2))
    loop_net = copy.deepcopy(net)

    def plain_loop(samples: Tensor | None = None) -> Tensor:
        if samples is None:
            samples = post.sample(NUM_SAMPLES, SCALE, seed=0, dtype=torch.float32)
        total = torch.zeros(())
        with torch.no_grad():
            for theta in samples:
                torch.nn.utils.vector_to_parameters(theta, loop_net.parameters())
                total = total + loop_net(x).softmax(dim=-1)
        return total / len(samples)

    ours = module_for(net, post)
    vmapped = module_for(net, post, vectorize="vmap")
    drawn = post.sample(NUM_SAMPLES, SCALE, seed=0, dtype=torch.float32)

    def new_run(module: SWAGModule) -> Callable[[], Any]:
        return lambda: (module.reset_samples(), module(x))

    contenders = {
        "one batch: plain loop": plain_loop,
        "one batch: SWAGModule": new_run(ours),
        "one batch: SWAGModule, vectorize='vmap'": new_run(vmapped),
        "later batch: plain loop": lambda: plain_loop(drawn),
        "later batch: SWAGModule": lambda: ours(x),
        "later batch: SWAGModule, vectorize='vmap'": lambda: vmapped(x),
    }
    times = median_times(contenders, repeats)
    error = float((ours(x)["mean"] - plain_loop(flat_samples(ours, net))).abs().max())
    return {"times": times, "error": error, "plan": ours.execution_plan}


# ---------------------------------------------------------------------- 4. against laplace-torch
def laplace_missing() -> str | None:
    """Why laplace-torch cannot be used (``None`` when it can)."""
    try:
        with quiet():
            import laplace  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure skips its rows
        return f"laplace-torch is not importable ({type(err).__name__}: {err}); its rows are skipped"
    return None


def jacobian_gib(classes: int, inputs: int) -> float:
    """GiB of the float32 ``[B, C, C·(F+1)]`` last-layer Jacobians of laplace-torch's GLM predictive."""
    return inputs * classes * classes * (WIDE_FEATURES + 1) * 4 / 2**30


def laplace_mode(row: str, classes: int, max_gib: float) -> tuple[int | None, str | None]:
    """Inputs per laplace-torch call (the batch, or 1) and a note; ``(None, why)`` when not run."""
    if row not in LAPLACE_ROWS or "fast" in row:
        return WIDE_BATCH, None
    if jacobian_gib(classes, WIDE_BATCH) <= max_gib:
        return WIDE_BATCH, None
    if jacobian_gib(classes, 1) <= max_gib:
        return 1, (
            f"one input per call (a batch's Jacobians need {jacobian_gib(classes, WIDE_BATCH):,.0f} GiB): "
            "time and memory of one input"
        )
    return None, (
        f"not run: its Jacobians need {jacobian_gib(classes, 1):,.1f} GiB per input "
        f"({jacobian_gib(classes, WIDE_BATCH):,.0f} GiB per batch; limit {max_gib:g})"
    )


def build_row(row: str, classes: int, snapshots: int, inputs: int) -> tuple[Callable[[], Any], float]:
    """The prediction of one row on one batch of 64, and the seconds its setup took (collecting the
    posterior or fitting the Laplace approximation)."""
    torch.manual_seed(0)
    net = HeadNet(classes, WIDE_FEATURES).eval()
    x = images(WIDE_BATCH)
    start = time.perf_counter()
    if row in OURS_ROWS:
        post = walk_posterior(net, ["head.*"], snapshots)
        kwargs: dict[str, Any] = {}
        if row.startswith("SWAG linearised"):
            kwargs = {
                "predictive": "linearized",
                "covariance": "diagonal" if "diagonal" in row else "low_rank",
            }
        module = module_for(net, post, **kwargs)
        return (lambda: module(x)["mean"]), time.perf_counter() - start
    predict = laplace_row(row, net, x)
    setup = time.perf_counter() - start
    if inputs == WIDE_BATCH:
        return predict, setup
    return (lambda: predict(x[:1])), setup


def laplace_row(row: str, net: HeadNet, x: Tensor) -> Callable[..., Tensor]:
    """laplace-torch's last-layer Laplace of ``net``, fitted on ``x`` with random labels; called on
    a batch (``x`` by default)."""
    from laplace import Laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    classes = net.head.out_features
    labels = torch.randint(0, classes, (len(x),), generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(x, labels), batch_size=8)
    fast = "fast" in row
    # the default backend's diagonal fit builds the [B, C, P] Jacobians; BackPACK's MC GGN does not
    structure = "kron" if "kron" in row else "diag"
    diag_backend = {"backend": BackPackGGN, "backend_kwargs": {"stochastic": True}}
    with quiet():
        la = Laplace(
            copy.deepcopy(net),
            "classification",
            subset_of_weights="last_layer",
            hessian_structure=structure,
            **(diag_backend if structure == "diag" else {}),
        )
        la.fit(loader)
    if not fast:
        return lambda batch=x: la(batch, pred_type="glm", link_approx="probit")

    def by_hand(batch: Tensor = x) -> Tensor:
        with torch.no_grad():
            f_mu, f_var = la.functional_variance_fast(batch)
            return torch.softmax(f_mu / (1 + math.pi / 8 * f_var).sqrt(), dim=-1)

    return by_hand


def memory_row(row: str, classes: int, snapshots: int, inputs: int) -> dict[str, Any]:
    """In this (fresh) process: peak RSS increase of the first and of a later batch of one row."""
    with quiet():
        predict, setup = build_row(row, classes, snapshots, inputs)
        first = peak_rss_increase(predict)
        later = peak_rss_increase(predict)
    return {"first": first, "later": later, "setup_seconds": setup}


def measure_memory(row: str, classes: int, snapshots: int, threads: int, inputs: int) -> dict[str, Any]:
    """:func:`memory_row` in a subprocess, so that no row inherits another's peak."""
    command = [sys.executable, __file__, "--memory-row", row, "--classes", str(classes)]
    command += ["--snapshots", str(snapshots), "--threads", str(threads), "--inputs", str(inputs)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def against_laplace(
    classes: int, repeats: int, snapshots: int, max_gib: float, missing: str | None, threads: int
) -> dict[str, Any]:
    """Times (in this process, interleaved) and peak memory (a subprocess per row) at ``classes``."""
    rows = [*(() if missing else LAPLACE_ROWS), *OURS_ROWS]
    modes = {row: laplace_mode(row, classes, max_gib) for row in rows}
    runnable = [row for row in rows if modes[row][0] is not None]
    built = {row: build_row(row, classes, snapshots, modes[row][0] or WIDE_BATCH) for row in runnable}
    slow = [row for row in runnable if modes[row][0] == 1]  # seconds to minutes per call
    with torch.no_grad(), quiet():
        times = median_times({row: built[row][0] for row in runnable if row not in slow}, repeats)
        for row in slow:  # one warm-up call, then one timed
            built[row][0]()
            start = time.perf_counter()
            built[row][0]()
            times[row] = time.perf_counter() - start
    memory = {
        row: measure_memory(row, classes, snapshots, threads, modes[row][0] or WIDE_BATCH) for row in runnable
    }
    return {
        "times": times,
        "inputs": {row: modes[row][0] for row in runnable},
        "setup": {row: built[row][1] for row in runnable},
        "memory": memory,
        "notes": {row: why for row, (_, why) in modes.items() if why},
    }


# ---------------------------------------------------------------------- tables
def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.1f}"


def _verdict(ratio: float, goal: float) -> str:
    return f"{ratio:.2f}× (goal ≤ {goal:g}×: {'met' if ratio <= goal else 'MISSED'})"


def small_table(res: dict[str, Any]) -> str:
    steady, first = res["steady"], res["first"]
    floor_steady = min(steady["forward"], steady["forward, channels-last input"])
    floor_first = min(first["forward"], first["forward, channels-last input"])
    lines = [
        "| contender | steady, ms | × floor | first batch of a fresh module, ms | × floor |",
        "|---|---|---|---|---|",
    ]
    for name, seconds in steady.items():
        one = first.get(name)
        ratio = "" if one is None else f"{one / floor_first:.2f}×"
        lines.append(f"| {name} | {_ms(seconds)} | {seconds / floor_steady:.2f}× | {_ms(one)} | {ratio} |")
    plans = "; ".join(
        f"{k}: split={p.split!r}, {p.vectorize}, channels_last={p.channels_last}"
        for k, p in res["plans"].items()
    )
    notes = [
        "",
        "Floor: one deterministic forward pass, the faster of the two input layouts.",
        f"Split vs full path, largest |Δ mean probability| = {res['split_error']:.2g}; linearised vs the "
        f"closed form = {res['closed_error']:.2g}; plans: {plans}",
    ]
    return "\n".join(lines + notes)


def output_table(results: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| classes | contender | steady, ms | × its floor | first batch, ms | × its first-batch floor |",
        "|---|---|---|---|---|---|",
    ]
    for classes, res in results.items():
        steady, first = res["steady"], res["first"]
        softmax_floor = steady["floor, sampled + softmax average"]
        for name in steady:
            floor_name = "floor, linearised" if name == "linearised" else "floor, sampled"
            if name.startswith("floor"):
                ratio = first_ratio = "(floor)"
            else:
                ratio = f"{steady[name] / steady[floor_name]:.2f}×"
                if name != "linearised":
                    ratio += f" ({steady[name] / softmax_floor:.2f}× with the softmax average)"
                first_ratio = f"{first[name] / first[floor_name]:.2f}×"
            lines.append(
                f"| {classes:,} | {name} | {_ms(steady[name])} | {ratio} | {_ms(first.get(name))} | {first_ratio} |"
            )
    notes = [
        "",
        f"Floors: sampled, one backbone forward + {NUM_SAMPLES} head matmuls (first batch: + drawing the "
        f"{NUM_SAMPLES} samples by hand); the backbone with the faster input layout; linearised, one backbone forward + {RANK + 2} head matmuls; "
        "link_approx='mc' is taken to the sampled floor (see the docstring). 'floor, sampled + softmax average': "
        "the sampled floor also averaging the softmax of each sample (part of the work of any BMA of probabilities).",
        *(
            f"{c:,} classes: mc vs sampled, largest |Δ mean probability| = {r['mc_error']:.2g}; "
            f"plan: {r['plan'].vectorize}; the floor's backbone ran {r['backbone_layout']}"
            for c, r in results.items()
        ),
    ]
    return "\n".join(lines + notes)


def full_table(res: dict[str, Any]) -> str:
    lines = [
        "| batch | plain loop, ms | SWAGModule, ms | SWAGModule / plain loop | vmap, ms | vmap / plain loop |",
        "|---|---|---|---|---|---|",
    ]
    t = res["times"]
    for case in ("one batch", "later batch"):
        loop, ours, vm = (
            t[f"{case}: plain loop"],
            t[f"{case}: SWAGModule"],
            t[f"{case}: SWAGModule, vectorize='vmap'"],
        )
        lines.append(
            f"| {case} | {_ms(loop)} | {_ms(ours)} | {ours / loop:.2f}× | {_ms(vm)} | {vm / loop:.2f}× |"
        )
    lines += [
        "",
        f"SWAGModule's plan {res['plan'].vectorize!r}; largest |Δ mean probability| against the plain loop on "
        f"the same samples = {res['error']:.2g}",
    ]
    return "\n".join(lines)


def laplace_table(results: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| classes | method | ms per input | × SWAG linearised | peak MiB, first call | "
        "peak MiB, later call | setup, s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for classes, res in results.items():
        ours = res["times"]["SWAG linearised"] / WIDE_BATCH
        for row, batch_seconds in res["times"].items():
            seconds = batch_seconds / res["inputs"][row]
            mem = res["memory"].get(row, {})
            first = mem.get("error") or _mib(mem.get("first"))
            later = "–" if "error" in mem else _mib(mem.get("later"))
            lines.append(
                f"| {classes:,} | {row} | {_ms(seconds)} | {seconds / ours:.2f}× | {first} | {later} | "
                f"{res['setup'][row]:.2f} | {res['notes'].get(row, '')} |"
            )
        for row, why in res["notes"].items():
            if row not in res["times"]:
                lines.append(f"| {classes:,} | {row} | – | | | | | {why} |")
    return "\n".join(lines)


def goals(
    small: dict[str, Any], outputs: dict[int, Any], full: dict[str, Any], laplace: dict[int, Any]
) -> str:
    steady, first = small["steady"], small["first"]
    floor_steady = min(steady["forward"], steady["forward, channels-last input"])
    floor_first = min(first["forward"], first["forward, channels-last input"])
    lines = [
        f"* small conv net, first batch of a fresh module, sampled: {_verdict(first['sampled (split)'] / floor_first, 1.5)}",
        f"* small conv net, first batch of a fresh module, linearised: {_verdict(first['linearised'] / floor_first, 1.5)}",
        f"* small conv net, steady state, sampled: {_verdict(steady['sampled (split)'] / floor_steady, 1.5)}",
        f"* small conv net, steady state, linearised: {_verdict(steady['linearised'] / floor_steady, 1.3)}",
    ]
    for classes, res in outputs.items():
        s = res["steady"]
        lines.append(f"* {classes:,} classes, sampled: {_verdict(s['sampled'] / s['floor, sampled'], 1.3)}")
        lines.append(
            f"* {classes:,} classes, linearised: {_verdict(s['linearised'] / s['floor, linearised'], 1.3)}"
        )
        mc = s["linearised, link_approx='mc'"] / s["floor, sampled"]
        lines.append(f"* {classes:,} classes, linearised mc (to the sampled floor): {_verdict(mc, 1.3)}")
    t = full["times"]
    for case in ("one batch", "later batch"):
        lines.append(
            f"* full posterior, {case}, against the plain loop: {_verdict(t[f'{case}: SWAGModule'] / t[f'{case}: plain loop'], 1.0)}"
        )
    for classes, res in laplace.items():
        ours = res["times"]["SWAG linearised"] / WIDE_BATCH
        ours_mem = res["memory"].get("SWAG linearised", {}).get("later")
        for row in LAPLACE_ROWS[:2]:
            if row in res["times"]:
                speed = res["times"][row] / res["inputs"][row] / ours  # per input
                mem = res["memory"].get(row, {}).get("later")
                per = "a batch" if res["inputs"][row] == WIDE_BATCH else "one input (ours: a batch of 64)"
                mem_text = f"; {mem / ours_mem:.1f}× the peak memory, for {per}" if mem and ours_mem else ""
                verdict = "met" if speed >= 10 else "MISSED"
                lines.append(
                    f"* {classes:,} classes: {row} takes {speed:.1f}× the time per input of linearised SWAG"
                    f"{mem_text} (goal ≥ 10× faster: {verdict})"
                )
            elif row in res["notes"]:
                lines.append(f"* {classes:,} classes: {row} {res['notes'][row]}; linearised SWAG runs")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats, 10 snapshots: a short run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per contender (default 15)")
    parser.add_argument("--snapshots", type=int, default=None, help="snapshots per posterior (default 30)")
    parser.add_argument("--classes", default="10,1000,3100", help="class counts of tables 2 and 4")
    parser.add_argument("--max-gib", type=float, default=8.0, help="laplace-torch's Jacobians may take this")
    parser.add_argument("--only", choices=("small", "outputs", "full", "laplace"), help="run one table")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-row", help=argparse.SUPPRESS)  # internal: one memory measurement
    parser.add_argument("--inputs", type=int, default=WIDE_BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.snapshots = args.snapshots or (10 if args.quick else 30)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_row:
        print(json.dumps(memory_row(args.memory_row, int(args.classes), args.snapshots, args.inputs)))
        return
    classes = [int(c) for c in args.classes.split(",")]
    missing = laplace_missing()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{machine_description()}; load average before: {load}", flush=True)
    wanted = {args.only} if args.only else {"small", "outputs", "full", "laplace"}
    results: dict[str, Any] = {}
    if "small" in wanted:
        results["small"] = small_net(args.repeats, args.snapshots)
        print(
            "\n## 1. A small conv net (128→10 head, 96 images)\n\n" + small_table(results["small"]),
            flush=True,
        )
    if "outputs" in wanted:
        results["outputs"] = {c: output_space(c, args.repeats, args.snapshots) for c in classes}
        print(
            f"\n## 2. Output spaces (512 features, batch {WIDE_BATCH})\n\n"
            + output_table(results["outputs"]),
            flush=True,
        )
    if "full" in wanted:
        with quiet():
            results["full"] = full_posterior(args.repeats, args.snapshots)
        print(
            "\n## 3. Full posterior (MLP 784-256-256-10) against the plain loop\n\n"
            + full_table(results["full"]),
            flush=True,
        )
    if "laplace" in wanted:
        results["laplace"] = {
            c: against_laplace(c, args.repeats, args.snapshots, args.max_gib, missing, args.threads)
            for c in classes
        }
        print("\n## 4. Against laplace-torch's last-layer Laplace (the network of table 2)\n")
        if missing:
            print(f"* {missing}\n")
        print(
            "Peak memory: resident-set high-water mark over the RSS after setup, each row in a fresh subprocess.\n\n"
            + laplace_table(results["laplace"])
        )
    print(
        f"\nrepeats={args.repeats}, snapshots={args.snapshots}, samples={NUM_SAMPLES}, scale={SCALE}, rank={RANK}, "
        f"threads={args.threads}"
    )
    if wanted == {"small", "outputs", "full", "laplace"}:
        print(
            "\n## Goals\n\n"
            + goals(results["small"], results["outputs"], results["full"], results["laplace"])
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=str, indent=1))


if __name__ == "__main__":
    main()
