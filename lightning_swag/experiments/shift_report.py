"""The shift benchmark's results as a page: tables (mean ± std over seeds), the goals of issue #30
checked on the numbers, and the data of its two figures, all read from the ``metrics.json`` that
:mod:`lightning_swag.experiments.shift` writes (so the page can be rebuilt without rerunning)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["LABELS", "report", "rotation_curves", "severity_values"]

LABELS = {
    "sgd": "SGD (MAP)",
    "temperature": "Temperature scaling",
    "swa": "SWA",
    "swag_diagonal": "SWAG-Diagonal",
    "swag": "SWAG",
    "multiswag": "MultiSWAG",
    "ensemble": "Deep ensemble",
    "last_layer_linearized": "Last-layer SWAG, linearised",
    "laplace_last_layer": "Last-layer Laplace (laplace-torch)",
}
"""Display names of the methods, in the tables' order."""
_PERCENT = {"accuracy", "ece"}
_ROTATION_COLUMNS = ("clean", "rot-45", "rot-90", "rot-135", "rot-180")
_SEVERITY_COLUMNS = (1, 3, 5)


def _kinds(table: dict[str, Any]) -> list[str]:
    return sorted(
        {shift.rsplit("-", 1)[0] for shift in table if shift[-1].isdigit() and not shift.startswith("rot")}
    )


def _rotations(table: dict[str, Any]) -> list[int]:
    return sorted(int(shift[4:]) for shift in table if shift.startswith("rot-"))


def _per_seed(result: dict[str, Any], method: str, value: Any) -> list[float]:
    """``value(table_of_method)`` in every seed that ran the method."""
    return [value(table[method]) for table in result["per_seed"].values() if method in table]


def _cell(values: Sequence[float], metric: str) -> str:
    factor = 100 if metric in _PERCENT else 1
    mean = statistics.mean(values) * factor
    spread = statistics.stdev(values) * factor if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {spread:.2f}" if factor == 100 else f"{mean:.3f} ± {spread:.3f}"


def _metric_table(result: dict[str, Any], metric: str) -> str:
    unit = ", %" if metric in _PERCENT else ""
    columns = [*_ROTATION_COLUMNS, *(f"severity {s}" for s in _SEVERITY_COLUMNS)]
    lines = [f"| {metric}{unit} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in (m for m in LABELS if m in result["methods"]):
        cells = []
        for shift in _ROTATION_COLUMNS:
            cells.append(_cell(_per_seed(result, method, lambda t, s=shift: t[s][metric]), metric))
        for severity in _SEVERITY_COLUMNS:

            def kinds_mean(t: dict[str, Any], s: int = severity) -> float:
                return statistics.mean(t[f"{kind}-{s}"][metric] for kind in _kinds(t))

            cells.append(_cell(_per_seed(result, method, kinds_mean), metric))
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ood_table(result: dict[str, Any]) -> str:
    lines = [
        "| OOD AUROC | Fashion-MNIST (MSP) | uniform noise (MSP) | Fashion-MNIST (entropy) | uniform noise (entropy) |",
        "|---|---|---|---|---|",
    ]
    for method in (m for m in LABELS if m in result["methods"]):
        cells = [
            _cell(_per_seed(result, method, lambda t, k=key, s=ood: t[k][s]), "auroc")
            for key in ("ood_auroc", "ood_auroc_entropy")
            for ood in ("fashion_mnist", "uniform_noise")
        ]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _below(
    result: dict[str, Any], method: str, others: Sequence[str], shift: str, metric: str
) -> tuple[bool, int]:
    """Whether ``method``'s seed-mean ``metric`` at ``shift`` is below every one of ``others``'s, and
    in how many seeds it was."""
    mean = result["methods"]
    on_mean = all(mean[method][shift][metric] < mean[o][shift][metric] for o in others)
    seeds = sum(
        all(table[method][shift][metric] < table[o][shift][metric] for o in others)
        for table in result["per_seed"].values()
    )
    return on_mean, seeds


def goals(result: dict[str, Any]) -> str:
    """The two quality goals of issue #30, checked on the seed means (and counted per seed)."""
    mean, seeds = result["methods"], len(result["per_seed"])
    lines = [
        "**Goal 1**: SWAG and MultiSWAG below SGD and temperature scaling in NLL and ECE at every rotation "
        "from 45° on.",
        "",
        "| rotation | NLL: SWAG · MultiSWAG · SGD · temperature | ECE, %: SWAG · MultiSWAG · SGD · temperature | "
        f"met on the mean (seeds of {seeds} where met) |",
        "|---|---|---|---|",
    ]
    met_everywhere = True
    for angle in (a for a in _rotations(mean["sgd"]) if a >= 45):
        shift, cells, verdicts = f"rot-{angle}", [], []
        for metric, factor, digits in (("nll", 1, 3), ("ece", 100, 2)):
            cells.append(
                " · ".join(
                    f"{factor * mean[m][shift][metric]:.{digits}f}"
                    for m in ("swag", "multiswag", "sgd", "temperature")
                )
            )
            for method in ("swag", "multiswag"):
                ok, count = _below(result, method, ("sgd", "temperature"), shift, metric)
                met_everywhere &= ok
                verdicts.append(f"{LABELS[method]} {metric.upper()} {'yes' if ok else '**no**'} ({count})")
        lines.append(f"| {angle}° | {cells[0]} | {cells[1]} | {'; '.join(verdicts)} |")
    lines += ["", f"Goal 1 {'met' if met_everywhere else '**not met**'} on the {seeds}-seed mean.", ""]
    shifts = [
        s
        for s in mean["multiswag"]
        if s != "clean" and isinstance(mean["multiswag"][s], dict) and "nll" in mean["multiswag"][s]
    ]
    misses = [s for s in shifts if mean["multiswag"][s]["nll"] > mean["ensemble"][s]["nll"]]
    lines.append(
        "**Goal 2**: MultiSWAG at or below the deep ensemble's NLL under shift: "
        + (
            f"met at all {len(shifts)} shifted sets."
            if not misses
            else f"**not met** at {len(misses)} of {len(shifts)} shifted sets: "
            + ", ".join(
                f"{s} ({mean['multiswag'][s]['nll']:.3f} vs {mean['ensemble'][s]['nll']:.3f})" for s in misses
            )
            + "."
        )
    )
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    """The results page's body: the setting, the tables and the goals."""
    parts = [
        f"Setting: {result['setting']}.",
        f"Machine: {result['machine']}; {result['seconds']:.0f} s in all.",
        "Columns `severity N`: the mean over the corruption kinds at that severity. Mean ± std over the seeds.",
    ]
    for metric in ("nll", "ece", "accuracy", "brier"):
        parts.append(_metric_table(result, metric))
    parts += [_ood_table(result), goals(result)]
    skipped = {m: why for fitted in result["fitted"].values() for m, why in fitted["skipped"].items()}
    parts += [f"Skipped: {LABELS[m]}: {why}." for m, why in skipped.items()]
    return "\n\n".join(parts) + "\n"


def rotation_curves(
    result: dict[str, Any],
) -> tuple[list[int], dict[str, dict[str, tuple[list[float], list[float]]]]]:
    """The angles (0 = clean) and ``{metric: {label: (means, stds)}}`` for the NLL and ECE figure."""
    mean, std = result["methods"], result["std"]
    angles = [0, *_rotations(mean["sgd"])]
    shifts = ["clean", *(f"rot-{a}" for a in angles[1:])]
    curves = {
        metric: {
            LABELS[m]: ([mean[m][s][metric] for s in shifts], [std[m][s][metric] for s in shifts])
            for m in LABELS
            if m in mean
        }
        for metric in ("nll", "ece")
    }
    return angles, {metric.upper(): by_method for metric, by_method in curves.items()}


def severity_values(result: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, list[list[float]]]]]:
    """The severities (``clean``, 1 … 5) and ``{metric: {label: [values per severity]}}`` over the
    corruption kinds and seeds, for the box plot."""
    tables = list(result["per_seed"].values())
    kinds = _kinds(result["methods"]["sgd"])
    severities = sorted(
        {int(s.rsplit("-", 1)[1]) for s in result["methods"]["sgd"] if s.split("-")[0] in kinds}
    )
    values = {
        metric: {
            LABELS[m]: [[t[m]["clean"][metric] for t in tables]]
            + [[t[m][f"{k}-{s}"][metric] for t in tables for k in kinds] for s in severities]
            for m in LABELS
            if m in result["methods"]
        }
        for metric in ("nll", "ece")
    }
    return ["clean", *map(str, severities)], {
        metric.upper(): by_method for metric, by_method in values.items()
    }
