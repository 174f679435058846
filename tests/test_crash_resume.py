"""Crash safety: a run SIGKILLed mid-epoch and resumed from ``last.ckpt`` ends with exactly the
posterior of the snapshots it really collected, which is the posterior of an uninterrupted run:
no snapshot lost, none counted twice.

The killed runs are subprocesses of ``crash_train_script.py`` (4 batches per epoch, 4 epochs,
a checkpoint every 3 optimizer steps, ``save_last=True``); the resumed and uninterrupted runs
execute the same code in this process. Every snapshot SWAG takes is logged to disk as it happens,
so the test knows what the killed process collected before it died.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import crash_train_script as script
import pytest
import torch

from lightning_swag import SWAGPosterior

SCRIPT = Path(__file__).with_name("crash_train_script.py")

# name: (mode, step at which the process is killed, snapshot steps lost with the process)
SCENARIOS = {
    # epoch 0's snapshot (step 4) is taken after checkpoint 3 and dies with the process at step 5
    "epoch-snapshot-after-checkpoint": ("epoch", 5, [4]),
    # checkpoint 12 is written on the last batch of epoch 2, after that epoch's snapshot: kept, not retaken
    "epoch-checkpoint-on-last-batch": ("epoch", 14, []),
    # snapshot 10 comes after checkpoint 9; the process dies at step 11
    "step-snapshot-after-checkpoint": ("step", 11, [10]),
    # snapshot 12 is taken and the process dies before checkpoint 12 is written
    "step-killed-before-checkpoint": ("step", 12, [10, 12]),
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL"),
]


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Start every killed run at once (they are independent), then wait for all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for name, (mode, kill_step, _) in SCENARIOS.items():
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(SCRIPT), str(out), "--mode", mode, "--tag", "killed"]
        cmd += ["--kill-at-step", str(kill_step)]
        procs[name] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env))
    results = {}
    for name, (out, proc) in procs.items():
        output, _ = proc.communicate(timeout=300)
        results[name] = (out, proc.returncode, output.decode(errors="replace"))
    return results


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[SWAGPosterior, list[dict]]]:
    """Uninterrupted runs of both modes: their posteriors and logged snapshots."""
    refs = {}
    for mode in ("epoch", "step"):
        out = tmp_path_factory.mktemp(f"reference-{mode}")
        swag = script.run(out, mode, "reference")
        refs[mode] = (swag.posterior, _snapshots(out, "reference"))
    return refs


def _snapshots(out: Path, tag: str) -> list[dict]:
    files = sorted((out / "snapshots").glob(f"{tag}_*.pt"))
    return [torch.load(f, weights_only=True) for f in files]


def _assert_same_posterior(actual: SWAGPosterior, expected: SWAGPosterior) -> None:
    assert actual.num_snapshots == expected.num_snapshots
    assert actual.rank == expected.rank
    torch.testing.assert_close(actual.mean, expected.mean, rtol=0, atol=0)
    torch.testing.assert_close(actual.second_moment, expected.second_moment, rtol=0, atol=0)
    torch.testing.assert_close(actual.deviations, expected.deviations, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sigkill_then_resume_loses_and_repeats_no_snapshot(name, killed_runs, references) -> None:
    mode, kill_step, lost_steps = SCENARIOS[name]
    out, returncode, output = killed_runs[name]
    assert returncode == -signal.SIGKILL, f"the training process was not killed:\n{output[-3000:]}"
    assert not (out / "posterior_killed.pt").exists()

    last = out / "ckpt" / "last.ckpt"
    checkpoint_step = torch.load(last, weights_only=False)["global_step"]
    expected_checkpoint = (kill_step - 1) // script.CHECKPOINT_EVERY * script.CHECKPOINT_EVERY
    assert checkpoint_step == expected_checkpoint
    killed = _snapshots(out, "killed")
    kept = [s for s in killed if s["step"] <= checkpoint_step]
    lost = [s for s in killed if s["step"] > checkpoint_step]
    assert [s["step"] for s in lost] == lost_steps  # the scenario is the one described

    swag = script.run(out, mode, "resumed", resume=last)
    resumed = _snapshots(out, "resumed")
    assert resumed[0]["n"] == len(kept) + 1  # numbering continues from the checkpoint's posterior

    # 1. the final posterior is exactly that of the snapshots collected (kept, then resumed)
    collected = kept + resumed
    rebuilt = SWAGPosterior(swag.posterior.param_shapes, script.MAX_RANK)
    for snap in collected:
        rebuilt.collect_flat(snap["theta"])
    _assert_same_posterior(swag.posterior, rebuilt)

    # 2. ... which are the uninterrupted run's snapshots, each once, with the same weights
    reference_posterior, reference_snaps = references[mode]
    assert [s["step"] for s in collected] == [s["step"] for s in reference_snaps]
    for got, want in zip(collected, reference_snaps, strict=True):
        assert torch.equal(got["theta"], want["theta"]), f"snapshot at step {got['step']} differs"
    _assert_same_posterior(swag.posterior, reference_posterior)

    # 3. what died with the process was taken again after the resume, identically
    retaken = {s["step"]: s["theta"] for s in resumed}
    for snap in lost:
        assert torch.equal(retaken[snap["step"]], snap["theta"])

    # the posterior written by the resumed run round-trips
    _assert_same_posterior(SWAGPosterior.load(out / "posterior_resumed.pt"), reference_posterior)
