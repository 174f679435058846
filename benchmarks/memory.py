"""Peak memory of SWAG collection and sampling for a ResNet-18-sized model (11.2M weights), next to
the memory formula.

Phases, each in a fresh subprocess (``--phase``) so that no phase inherits another's peak:

* ``baseline``: the process with torch, torchvision and the model loaded.
* ``collect``: ``SWAGPosterior.from_model(model, max_rank=K)`` and ``--snapshots`` calls to
  ``collect`` (the weights are perturbed in place between snapshots; no training).
* ``sample``: the collected posterior (saved by ``collect``, loaded, scratch vector touched as
  after a collection), then ``posterior.sample(chunk)`` until ``--samples`` weight vectors are
  drawn (each chunk is consumed, then dropped).
* ``bma``: the same posterior in ``SWAGModule(model, posterior, num_samples=--samples,
  chunk_size=chunk)`` on one batch of 8 CIFAR-sized images (sampling + vectorised forward).

The peak of a phase is the resident-set high-water mark (``VmHWM``) after it was reset to the
current RSS at the start of the phase (``/proc/self/clear_refs``, Linux); elsewhere a 1 ms psutil
polling thread. ``getrusage``'s ``ru_maxrss`` (also printed) reads the same kernel high-water mark,
so on Linux it is reset with it. The formula (bytes; ``P`` weights, rank ``K``):

* posterior: moments ``2·P·8`` (float64) + deviations ``K·P·4`` (float32) + scratch ``P·8``;
* ``sample`` (float64 samples, the moment dtype): ``chunk·P·8``;
* ``bma`` (float32 samples for the float32 model, drawn straight in float32): the cached float32
  mean and standard deviation ``2·P·4`` + ``chunk·P·4``;
* all on top of the baseline RSS.

``--outputs`` runs ``benchmarks/output_memory.py`` instead: the peak memory of the BMA's outputs at
1,000 and 16,000 samples with ``chunk_size=10`` (bounded by the chunk, not by ``num_samples``).

Usage::

    python benchmarks/memory.py --outputs
    python benchmarks/memory.py [--model resnet18|mlp] [--rank 20] [--snapshots 25] [--samples 30]
                                [--chunks 1 4] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_swag import SWAGModule, SWAGPosterior

MiB = 2**20
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


# ---------------------------------------------------------------------- measuring
def current_rss() -> int:
    """Resident set size of this process, bytes."""
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    import psutil

    return psutil.Process().memory_info().rss


def ru_maxrss() -> int:
    """Lifetime peak RSS from ``getrusage`` (KiB on Linux, bytes on macOS), in bytes."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


class PeakRSS:
    """Peak resident set size over a ``with`` block.

    Linux: ``VmHWM`` reset to the current RSS at entry (writing ``5`` to ``/proc/self/clear_refs``)
    and read at exit, so the peak is exact. Elsewhere: a thread polling psutil every millisecond.
    """

    def __enter__(self) -> PeakRSS:
        self.before = current_rss()
        self._exact = False
        try:
            _CLEAR_REFS.write_text("5")
            self._exact = True
        except OSError:
            import psutil

            self._proc, self._stop, self._max = psutil.Process(), threading.Event(), self.before
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        if self._exact:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = int(line.split()[1]) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._max
        self.after = current_rss()
        self.method = "VmHWM (reset at phase start)" if self._exact else "psutil polling (1 ms)"


# ---------------------------------------------------------------------- workload
def build_model(name: str) -> nn.Module:
    """ResNet-18 for 10 classes (11,181,642 weights) or an MLP of about the same size."""
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(3072, 2048),
            nn.ReLU(),
            nn.Linear(2048, 2048),
            nn.ReLU(),
            nn.Linear(2048, 10),
        )
    raise ValueError(f"unknown model {name!r}")


def collect(model: nn.Module, rank: int, snapshots: int) -> SWAGPosterior:
    """A posterior of ``snapshots`` perturbed copies of the weights (perturbed in place)."""
    post = SWAGPosterior.from_model(model, max_rank=rank)
    g = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for _ in range(snapshots):
            for p in params:  # temporaries: one parameter's worth of noise at a time
                p.add_(torch.randn(p.shape, generator=g), alpha=1e-2)
            post.collect(model)
    return post


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """One phase in this (fresh) process; returns its measurements."""
    model = build_model(args.model)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result: dict[str, Any] = {"phase": args.phase, "chunk": args.chunk, "num_params": num_params}
    result["baseline"] = current_rss()
    if args.phase == "baseline":
        return result
    if args.phase == "collect":
        with PeakRSS() as m:
            post = collect(model, args.rank, args.snapshots)
        assert post.num_snapshots == args.snapshots
        post.save(args.posterior_file)
    else:
        post = SWAGPosterior.load(args.posterior_file)
        post._scratch.zero_()  # resident, as after a collection
        generator = torch.Generator().manual_seed(0)
        if args.phase == "bma":
            module = SWAGModule(model.eval(), post, num_samples=args.samples, chunk_size=args.chunk, seed=0)
            x = torch.randn(8, 3, 32, 32, generator=generator)
            with PeakRSS() as m:
                out = module(x)
            assert out["mean"].shape == (8, 10)
        else:
            draw = post.sample
            checksum = 0.0
            with PeakRSS() as m:
                remaining = args.samples
                while remaining > 0:
                    n = min(args.chunk, remaining)
                    checksum += float(draw(n, generator=generator).sum())
                    remaining -= n
            result["checksum"] = checksum
    result.update(
        before=m.before, peak=m.peak, after=m.after, seconds=m.seconds, method=m.method, ru_maxrss=ru_maxrss()
    )
    return result


def predicted(phase: str, num_params: int, rank: int, chunk: int | None) -> int:
    """Bytes above the baseline that the formula predicts at the peak of ``phase``."""
    posterior = 2 * num_params * 8 + rank * num_params * 4 + num_params * 8
    if phase == "collect":
        return posterior
    if phase == "bma":
        return posterior + 2 * num_params * 4 + (chunk or 0) * num_params * 4
    return posterior + (chunk or 0) * num_params * 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet18", "mlp"], default="resnet18")
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--snapshots", type=int, default=25)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--phases", nargs="+", default=["baseline", "collect", "sample", "bma"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument(
        "--outputs",
        action="store_true",
        help="instead: the BMA's output memory at 1,000 and 16,000 samples (benchmarks/output_memory.py)",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--posterior-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.outputs:
        subprocess.run([sys.executable, str(Path(__file__).with_name("output_memory.py"))], check=True)
        return
    if args.phase:  # child process
        print(json.dumps(run_phase(args)))
        return

    tmp = tempfile.TemporaryDirectory(prefix="swag-memory-")
    common = ["--model", args.model, "--rank", str(args.rank), "--snapshots", str(args.snapshots)]
    common += ["--samples", str(args.samples), "--posterior-file", str(Path(tmp.name) / "posterior.pt")]
    phases = [p for p in args.phases if p != "collect"]
    phases.insert(1 if "baseline" in phases else 0, "collect")  # the others load its posterior
    jobs = []
    for phase in phases:
        for chunk in args.chunks if phase in ("sample", "bma") else [None]:
            jobs.append((phase, chunk))
    results = []
    for phase, chunk in jobs:
        cmd = [sys.executable, __file__, "--phase", phase, *common]
        if chunk is not None:
            cmd += ["--chunk", str(chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  ran {phase}{'' if chunk is None else f' (chunk {chunk})'}", file=sys.stderr)

    num_params = results[0]["num_params"]
    baseline = next((r["baseline"] for r in results if r["phase"] == "baseline"), results[0]["baseline"])
    print(
        f"\n{args.model}: P = {num_params:,} trainable weights, rank K = {args.rank}, "
        f"{args.snapshots} snapshots, {args.samples} samples; torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        f"baseline RSS (torch + model loaded): {baseline / MiB:,.0f} MiB; peaks measured with "
        f"{next((r['method'] for r in results if 'method' in r), '-')}\n"
    )
    header = (
        f"{'phase':<12} {'chunk':>5} {'RSS before':>11} {'peak RSS':>10} {'peak-baseline':>14} "
        f"{'formula':>9} {'measured/formula':>17} {'ru_maxrss':>10} {'time':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r["phase"] == "baseline":
            print(f"{'baseline':<12} {'':>5} {'':>11} {r['baseline'] / MiB:>9,.0f}M")
            continue
        extra = r["peak"] - r["baseline"]
        formula = predicted(r["phase"], num_params, args.rank, r["chunk"])
        r["formula_above_baseline"] = formula
        print(
            f"{r['phase']:<12} {r['chunk'] or '':>5} {r['before'] / MiB:>10,.0f}M {r['peak'] / MiB:>9,.0f}M "
            f"{extra / MiB:>13,.0f}M {formula / MiB:>8,.0f}M {extra / formula:>17.2f} "
            f"{r['ru_maxrss'] / MiB:>9,.0f}M {r['seconds']:>6.1f}s"
        )
    p8 = num_params * 8 / MiB
    print(
        f"\nformula terms: moments 2·P·8 = {2 * p8:,.0f} MiB, deviations K·P·4 = {args.rank * p8 / 2:,.0f} MiB, "
        f"scratch P·8 = {p8:,.0f} MiB, one float64 sample P·8 = {p8:,.0f} MiB, "
        f"float32 mean + std (bma) 2·P·4 = {p8:,.0f} MiB"
    )
    tmp.cleanup()
    if args.json is not None:
        args.json.write_text(
            json.dumps({"num_params": num_params, "rank": args.rank, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
