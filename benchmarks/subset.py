"""Subset posteriors, measured side by side in one run: the goals of issue #19.

Four tables, each at every ``--threads`` count (``torch.set_num_threads``), after a line describing
the machine. Times are medians of ``--repeats`` interleaved calls (the order of the contenders is
rotated at every repetition) after two warm-up calls, so one-off first-batch work (the checks of
the split, the vmap/loop choice, drawing the run's samples) is left out; the first batch is
reported apart.

1. **Head-only** (a small conv backbone with a 128→10 linear head, 96 images 32×32, a rank-20
   posterior over ``head.*`` from 30 snapshots): the sampled BMA with 30 samples (the backbone runs
   once per batch, ``split_forward=True``) and the linearised predictive, against one
   deterministic forward pass of the model (goals ≤ 1.5× and ≤ 1.3×), with the split path's
   largest difference from the full path (same seed) and the linearised probabilities' largest
   difference from the closed form computed here from ``post.mean``/``variance``/``deviations``.
2. **Full posterior** (an MLP 784-256-256-10, 96 inputs, rank 20): ``SWAGModule`` against the plain
   hand-written loop (``posterior.sample`` of float32 vectors, ``vector_to_parameters``, eval
   forward, softmax average; goal ≤ 1.0×), for one batch from the posterior (sampling included) and
   for a later batch of a run (samples drawn once).
3. and 4. **Against laplace-torch 0.3** (``Laplace(model, "classification",
   subset_of_weights="last_layer", hessian_structure="diag" | "kron")``, called as
   ``la(x, pred_type="glm", link_approx="probit")``) on the network of table 1 with 10 and 3,100
   classes: time and peak memory per batch of 96 against last-layer SWAG (linearised, and sampled
   with 30 samples). laplace-torch's call builds the ``[B, C, P]`` last-layer Jacobians; where
   they would not fit in ``--max-gib`` the row says so instead of running. One more row runs its
   diagonal ``functional_variance_fast`` (what ``la(...)`` does not call) with the probit by hand.
   Peak memory: each row in a fresh subprocess, the resident-set high-water mark (``VmHWM`` of
   ``/proc/self/status``, reset through ``/proc/self/clear_refs``) over the RSS after setup (model
   built, posterior collected or Laplace fitted), for the first batch and for a later one. Linux
   only; elsewhere the column is "n/a". laplace-torch is optional: without it those rows are
   skipped with a message.

Usage::

    python benchmarks/subset.py [--quick] [--threads 1,2] [--repeats 15] [--json results.json]
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
MiB = 2**20
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
LAPLACE_ROWS = ("laplace diag", "laplace kron", "laplace diag, fast variance by hand")
OURS_ROWS = ("SWAG linearised", "SWAG linearised, covariance='diagonal'", "SWAG sampled (30)")


# ---------------------------------------------------------------------- networks and posteriors
class HeadNet(nn.Module):
    """A small conv backbone (3×32×32 → 128 features) and a linear head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(256, 128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, classes)

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


def images(seed: int = 1) -> Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


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


def first_call(build: Callable[[], Callable[[], Any]], repeats: int = 3) -> float:
    """Median seconds of the first call of a freshly built contender."""
    values = []
    for _ in range(repeats):
        fn = build()
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return statistics.median(values)


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


# ---------------------------------------------------------------------- 1. head-only
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


def head_only(repeats: int, snapshots: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = HeadNet(10).eval()
    post = walk_posterior(net, ["head.*"], snapshots)
    x = images()

    def module(**kwargs: Any) -> SWAGModule:
        options = {"num_samples": NUM_SAMPLES, "scale": SCALE, "seed": 0, "task": "classification"}
        return SWAGModule(net, post, **{**options, **kwargs})

    sampled, full, lin = module(), module(split_forward=False), module(predictive="linearized")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        contenders = {
            "deterministic forward": lambda: net(x),
            "deterministic forward, channels-last input": lambda: net(x_cl),
            "sampled, head only (split)": lambda: sampled(x),
            "sampled, whole model per sample (split_forward=False)": lambda: full(x),
            "linearised": lambda: lin(x),
        }
        times = median_times(contenders, repeats)
    firsts = {
        "sampled, head only (split)": first_call(lambda: (lambda m: lambda: m(x))(module())),
        "linearised": first_call(lambda: (lambda m: lambda: m(x))(module(predictive="linearized"))),
    }
    split_error = float((sampled(x)["mean"] - full(x)["mean"]).abs().max())
    closed_error = float((lin(x)["mean"].double() - closed_form_probit(net, post, x)).abs().max())
    plans = {"sampled": sampled.execution_plan, "linearised": lin.execution_plan, "full": full.execution_plan}
    return {
        "times": times,
        "firsts": firsts,
        "split_error": split_error,
        "closed_error": closed_error,
        "plans": plans,
    }


# ---------------------------------------------------------------------- 2. full posterior vs the plain loop
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

    ours = SWAGModule(net, post, num_samples=NUM_SAMPLES, scale=SCALE, seed=0, task="classification")
    vmapped = SWAGModule(
        net, post, num_samples=NUM_SAMPLES, scale=SCALE, seed=0, task="classification", vectorize="vmap"
    )
    drawn = post.sample(NUM_SAMPLES, SCALE, seed=0, dtype=torch.float32)

    def fresh(module: SWAGModule) -> Callable[[], Any]:
        return lambda: (module.reset_samples(), module(x))

    contenders = {
        "one batch: plain loop": plain_loop,
        "one batch: SWAGModule": fresh(ours),
        "one batch: SWAGModule, vectorize='vmap'": fresh(vmapped),
        "later batch: plain loop": lambda: plain_loop(drawn),
        "later batch: SWAGModule": lambda: ours(x),
        "later batch: SWAGModule, vectorize='vmap'": lambda: vmapped(x),
    }
    times = median_times(contenders, repeats)
    error = float((ours(x)["mean"] - plain_loop(flat_samples(ours, net))).abs().max())
    return {"times": times, "error": error, "plan": ours.execution_plan}


# ---------------------------------------------------------------------- 3./4. against laplace-torch
def laplace_missing() -> str | None:
    """Why laplace-torch cannot be used (``None`` when it can)."""
    try:
        with quiet():
            import laplace  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure skips its rows
        return f"laplace-torch is not importable ({type(err).__name__}: {err}); its rows are skipped"
    return None


def jacobian_gib(classes: int) -> float:
    """GiB of the float32 ``[B, C, P]`` last-layer Jacobians laplace-torch's GLM predictive builds."""
    return BATCH * classes * classes * (128 + 1) * 4 / 2**30


def infeasible(row: str, classes: int, max_gib: float) -> str | None:
    """Why a row is not run (its memory), or ``None``."""
    if row in LAPLACE_ROWS and "fast" not in row and jacobian_gib(classes) > max_gib:
        return f"not run: its [B, C, P] Jacobians need {jacobian_gib(classes):,.0f} GiB (limit {max_gib:g})"
    return None


def build_row(row: str, classes: int, snapshots: int) -> tuple[Callable[[], Tensor], float]:
    """The prediction of one row on one batch, and the seconds its setup took (collecting the
    posterior or fitting the Laplace approximation)."""
    torch.manual_seed(0)
    net = HeadNet(classes).eval()
    x = images()
    start = time.perf_counter()
    if row in OURS_ROWS:
        post = walk_posterior(net, ["head.*"], snapshots)
        kwargs: dict[str, Any] = {"num_samples": NUM_SAMPLES}
        if row.startswith("SWAG linearised"):
            kwargs = {
                "predictive": "linearized",
                "covariance": "diagonal" if "diagonal" in row else "low_rank",
            }
        module = SWAGModule(net, post, task="classification", scale=SCALE, seed=0, **kwargs)
        return (lambda: module(x)["mean"]), time.perf_counter() - start
    predict = laplace_row(row, net, x)
    return predict, time.perf_counter() - start


def laplace_row(row: str, net: HeadNet, x: Tensor) -> Callable[[], Tensor]:
    """laplace-torch's last-layer Laplace of ``net``, fitted on the batch with random labels."""
    from laplace import Laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    classes = net.head.out_features
    labels = torch.randint(0, classes, (len(x),), generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(x, labels), batch_size=32)
    fast = "fast" in row
    # the default backend's diagonal fit builds the [B, C, P] Jacobians too; BackPACK's MC GGN does not
    options: dict[str, Any] = {"backend": BackPackGGN, "backend_kwargs": {"stochastic": True}} if fast else {}
    structure = "kron" if "kron" in row else "diag"
    with quiet():
        la = Laplace(
            copy.deepcopy(net),
            "classification",
            subset_of_weights="last_layer",
            hessian_structure=structure,
            **options,
        )
        la.fit(loader)
    if not fast:
        return lambda: la(x, pred_type="glm", link_approx="probit")

    def by_hand() -> Tensor:
        with torch.no_grad():
            f_mu, f_var = la.functional_variance_fast(x)
            return torch.softmax(f_mu / (1 + math.pi / 8 * f_var).sqrt(), dim=-1)

    return by_hand


def memory_row(row: str, classes: int, snapshots: int) -> dict[str, Any]:
    """In this (fresh) process: peak RSS increase of the first and of a later batch of one row."""
    with quiet():
        predict, setup = build_row(row, classes, snapshots)
        first = peak_rss_increase(predict)
        later = peak_rss_increase(predict)
    return {"first": first, "later": later, "setup_seconds": setup}


def measure_memory(row: str, classes: int, snapshots: int, threads: int) -> dict[str, Any]:
    """:func:`memory_row` in a subprocess, so that no row inherits another's peak."""
    command = [sys.executable, __file__, "--memory-row", row, "--classes", str(classes)]
    command += ["--snapshots", str(snapshots), "--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def against_laplace(
    classes: int,
    repeats: int,
    snapshots: int,
    max_gib: float,
    missing: str | None,
    memory_threads: int | None,
) -> dict[str, Any]:
    """Times (in this process, interleaved) and peak memory (subprocesses; only when
    ``memory_threads`` is given) of every row at ``classes``."""
    rows = [*(() if missing else LAPLACE_ROWS), *OURS_ROWS]
    skipped = {row: infeasible(row, classes, max_gib) for row in rows}
    runnable = [row for row in rows if skipped[row] is None]
    built = {row: build_row(row, classes, snapshots) for row in runnable}
    with quiet():
        times = median_times({row: built[row][0] for row in runnable}, repeats)
    memory = {}
    if memory_threads is not None:
        memory = {row: measure_memory(row, classes, snapshots, memory_threads) for row in runnable}
    return {
        "times": times,
        "setup": {row: built[row][1] for row in runnable},
        "memory": memory,
        "skipped": {row: why for row, why in skipped.items() if why},
    }


# ---------------------------------------------------------------------- tables
def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.1f}"


def head_table(results: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| threads | contender | ms per batch | × deterministic forward | first batch, ms |",
        "|---|---|---|---|---|",
    ]
    for threads, res in results.items():
        base = res["times"]["deterministic forward"]
        for name, seconds in res["times"].items():
            lines.append(
                f"| {threads} | {name} | {_ms(seconds)} | {seconds / base:.2f}× | {_ms(res['firsts'].get(name))} |"
            )
    notes = [
        f"* threads={t}: split vs full path, largest |Δ mean probability| = {r['split_error']:.2g}; "
        f"linearised vs the closed form = {r['closed_error']:.2g}; plans: "
        + "; ".join(
            f"{k}: split={p.split!r}, {p.vectorize}, channels_last={p.channels_last}"
            for k, p in r["plans"].items()
        )
        for t, r in results.items()
    ]
    return "\n".join(lines + [""] + notes)


def full_table(results: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| threads | batch | plain loop, ms | SWAGModule, ms | SWAGModule / plain loop | vmap, ms | vmap / plain loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for threads, res in results.items():
        t = res["times"]
        for case in ("one batch", "later batch"):
            loop, ours, vm = (
                t[f"{case}: plain loop"],
                t[f"{case}: SWAGModule"],
                t[f"{case}: SWAGModule, vectorize='vmap'"],
            )
            lines.append(
                f"| {threads} | {case} | {_ms(loop)} | {_ms(ours)} | {ours / loop:.2f}× | {_ms(vm)} | {vm / loop:.2f}× |"
            )
    notes = [
        f"* threads={t}: SWAGModule's plan {r['plan'].vectorize!r}; largest |Δ mean probability| against the plain "
        f"loop on the same samples = {r['error']:.2g}"
        for t, r in results.items()
    ]
    return "\n".join(lines + [""] + notes)


def laplace_table(results: dict[tuple[int, int], dict[str, Any]]) -> str:
    lines = [
        "| threads | classes | method | ms per batch | × SWAG linearised | peak MiB, first batch | "
        "peak MiB, later batch | setup, s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (threads, classes), res in results.items():
        ours = res["times"]["SWAG linearised"]
        for row, seconds in res["times"].items():
            mem = res["memory"].get(row, {})
            first = "–" if not mem else mem.get("error") or _mib(mem["first"])
            later = "–" if not mem else ("–" if "error" in mem else _mib(mem["later"]))
            lines.append(
                f"| {threads} | {classes:,} | {row} | {_ms(seconds)} | {seconds / ours:.2f}× | {first} | {later} | "
                f"{res['setup'][row]:.2f} |"
            )
        for row, why in res["skipped"].items():
            lines.append(f"| {threads} | {classes:,} | {row} | {why} | | | | |")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def goals(head: dict[int, Any], full: dict[int, Any], laplace: dict[tuple[int, int], Any]) -> str:
    lines = []
    for threads, res in head.items():
        t = res["times"]
        base = t["deterministic forward"]
        sampled, lin = t["sampled, head only (split)"] / base, t["linearised"] / base
        lines.append(
            f"* threads={threads}: head-only sampled BMA {sampled:.2f}× a forward pass (goal ≤ 1.5×: {_verdict(sampled <= 1.5)})"
        )
        lines.append(
            f"* threads={threads}: linearised, linear head {lin:.2f}× (goal ≤ 1.3×: {_verdict(lin <= 1.3)})"
        )
    for threads, res in full.items():
        t = res["times"]
        for case in ("one batch", "later batch"):
            ratio = t[f"{case}: SWAGModule"] / t[f"{case}: plain loop"]
            lines.append(
                f"* threads={threads}: full posterior, {case}, {ratio:.2f}× the plain loop (goal ≤ 1.0×: {_verdict(ratio <= 1.0)})"
            )
    for (threads, classes), res in laplace.items():
        ours = res["times"]["SWAG linearised"]
        ours_mem = res["memory"].get("SWAG linearised", {}).get("later")
        for row in LAPLACE_ROWS:
            if row in res["times"]:
                speed = res["times"][row] / ours
                mem = res["memory"].get(row, {}).get("later")
                mem_text = f", {mem / ours_mem:.1f}× the memory of a later batch" if mem and ours_mem else ""
                lines.append(
                    f"* threads={threads}, {classes:,} classes: {row} takes {speed:.1f}× the time of linearised SWAG"
                    f"{mem_text} (goal ≥ 10× faster: {_verdict(speed >= 10)})"
                )
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats, 10 snapshots: a short run")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per contender (default 15)")
    parser.add_argument("--snapshots", type=int, default=None, help="snapshots per posterior (default 30)")
    parser.add_argument("--classes", default="10,3100", help="class counts against laplace-torch")
    parser.add_argument("--max-gib", type=float, default=4.0, help="skip laplace-torch rows needing more")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-row", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.snapshots = args.snapshots or (10 if args.quick else 30)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if args.memory_row:
        torch.set_num_threads(threads[0])
        print(json.dumps(memory_row(args.memory_row, int(args.classes), args.snapshots)))
        return
    missing = laplace_missing()
    head, full, laplace = {}, {}, {}
    for t in threads:
        torch.set_num_threads(t)
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"threads={t}: {machine_description()}; load average before: {load}", flush=True)
        with quiet():
            head[t] = head_only(args.repeats, args.snapshots)
            full[t] = full_posterior(args.repeats, args.snapshots)
        for classes in (int(c) for c in args.classes.split(",")):
            memory_threads = t if t == threads[0] else None
            laplace[(t, classes)] = against_laplace(
                classes, args.repeats, args.snapshots, args.max_gib, missing, memory_threads
            )
    print(
        f"\nrepeats={args.repeats}, snapshots={args.snapshots}, batch={BATCH}, samples={NUM_SAMPLES}, scale={SCALE}"
    )
    print("\n## 1. Head-only (conv backbone, 128→10 linear head)\n\n" + head_table(head))
    print("\n## 2. Full posterior (MLP 784-256-256-10) against the plain loop\n\n" + full_table(full))
    print("\n## 3. Against laplace-torch's last-layer Laplace\n")
    if missing:
        print(f"* {missing}\n")
    print(
        "Peak memory: resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the RSS "
        f"after setup, each row in a fresh subprocess, at threads={threads[0]}.\n"
    )
    print(laplace_table(laplace))
    print("\n## Goals\n\n" + goals(head, full, laplace))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"head": head, "full": full, "laplace": {f"{k[0]}/{k[1]}": v for k, v in laplace.items()}},
                default=str,
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
