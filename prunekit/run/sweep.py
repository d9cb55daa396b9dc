"""`prunekit sweep`: the accuracy-versus-sparsity grid of the papers, resumable.

Every cell (pruner, sparsity, seed) is one in-memory run whose summary is written atomically
to ``OUT/cells/NAME.json``; a cell whose file exists is not recomputed, so an interrupted sweep
resumes where it stopped. ``results.csv``, ``results.md`` and ``accuracy_vs_sparsity.png`` are
rebuilt from the cell files at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from prunekit.errors import InputFileError, UsageError
from prunekit.run.config import PruneConfig
from prunekit.run.recipe import absolute_model
from prunekit.runtime.outputs import MARKER, inside_cwd_chain, staged_file, write_marker
from prunekit.runtime.schema import Lenient, parsed

COLUMNS = (
    "model",
    "schedule",
    "pruner",
    "sparsity",
    "seed",
    "achieved_sparsity",
    "accuracy_dense",
    "accuracy",
    "seconds",
    "latency_ms",
    "speedup",
)


def cell_name(pruner: str, sparsity: float, seed: int) -> str:
    return f"{pruner}_s{sparsity:g}_seed{seed}"


def _settings(base: PruneConfig) -> dict[str, Any]:
    """What must not change when a sweep is resumed."""
    view = base.to_json()
    for key in ("pruner", "sparsity", "seed", "out", "force", "verbose"):
        view.pop(key)
    return json.loads(json.dumps(view))  # the form it has when read back (tuples -> lists)


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path} is corrupt ({exc}); {fix}") from exc


def check_sweep_folder(out: Path) -> None:
    """A sweep writes a new or empty folder, or resumes one holding its sweep.json."""
    if inside_cwd_chain(out):
        raise UsageError(f"--out {out} is the current folder or one above it; name a new one")
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"--out {out} is not a folder; pick another --out")
    started = out.is_dir() and any(not _left_by_a_failed_start(p) for p in out.iterdir())
    if started and not ((out / "sweep.json").exists() and (out / MARKER).is_file()):
        raise UsageError(
            f"--out {out} holds files and is not a prunekit sweep (no sweep.json and "
            f"{MARKER}): a sweep resumes only its own folder; pick another --out"
        )


def _left_by_a_failed_start(path: Path) -> bool:
    """What a sweep makes before its sweep.json (which a full disk can stop): the marker and
    an empty cells/ folder; they do not make the folder another tool's."""
    if path.name == MARKER:
        return True
    return path.name == "cells" and path.is_dir() and not any(path.iterdir())


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class SweepCell(Lenient):
    """One cell's result as a sweep reads it back (a file that may have been edited)."""

    model: str
    schedule: str
    pruner: str
    sparsity: Fraction
    seed: Annotated[int, Field(ge=0)]
    achieved_sparsity: Fraction
    accuracy_dense: Fraction | None
    accuracy: Fraction | None
    seconds: Annotated[float, Field(ge=0.0)]
    latency_ms: Annotated[float, Field(gt=0.0)] | None = None  # --structure, --quantize
    speedup: Annotated[float, Field(gt=0.0)] | None = None


def _read_cell(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """A cell's result, checked against its schema and against the cell it is named for."""
    fix = f"delete {path.name} and rerun the sweep to recompute that cell"
    if path.is_symlink() or not path.is_file():
        raise InputFileError(f"{path} is not a plain file; {fix}")
    row = parsed(SweepCell, path.read_bytes(), str(path), fix).model_dump()
    other = sorted(k for k, v in expected.items() if row[k] != v)
    if other:
        raise InputFileError(
            f"{path} holds the result of another cell "
            f"({', '.join(f'{k} {row[k]!r}' for k in other)}); {fix}"
        )
    return row


def finished_cells(out: Path) -> int:
    """How many cells an (interrupted) sweep in ``out`` has kept."""
    return len(list((out / "cells").glob("*.json"))) if (out / "cells").is_dir() else 0


def _write_json(path: Path, obj: Any) -> None:
    with staged_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def run_sweep(
    base: PruneConfig,
    pruners: Sequence[str],
    sparsities: Sequence[float],
    seeds: Sequence[int],
    out: Path,
    execute: Callable[[PruneConfig], dict[str, Any]],
    on_cell: Callable[[str, bool], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every missing cell with ``execute``; return all rows (CSV columns)."""
    if not pruners or not sparsities or not seeds:
        raise UsageError("--pruners, --sparsities and --seeds each need at least one value")
    for flag, values in (("--pruners", pruners), ("--sparsities", sparsities), ("--seeds", seeds)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise UsageError(
                f"{flag} lists {', '.join(repeated)} more than once; each cell runs once "
                "(a repeated seed would count twice in the mean): drop the repeats"
            )
    settings = _settings(base)
    marker = out / "sweep.json"
    check_sweep_folder(out)
    if marker.exists():
        previous = _read_json(marker, "delete the folder to start the sweep again")
        if not isinstance(previous, dict):
            raise InputFileError(f"{marker} is not a sweep's settings; delete the folder")
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise UsageError(
                f"{out} holds a sweep with other settings ({', '.join(changed)}); use another "
                "--out, or delete it to start again"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(exist_ok=True)
    write_marker(out, "sweep")  # a run's --force never replaces a sweep
    _write_json(marker, settings)
    rows = []
    for pruner in pruners:
        for sparsity in sparsities:
            for seed in seeds:
                name = cell_name(pruner, sparsity, seed)
                path = out / "cells" / f"{name}.json"
                cached = path.exists()
                if not cached:
                    config = dataclasses.replace(base, pruner=pruner, sparsity=sparsity, seed=seed)
                    report = execute(config)
                    _write_json(
                        path,
                        {
                            "model": report["model"],
                            "schedule": base.schedule.kind,
                            "pruner": pruner,
                            "sparsity": sparsity,
                            "seed": seed,
                            "achieved_sparsity": report["sparsity"]["achieved"],
                            "accuracy_dense": report["accuracy"]["dense"],
                            "accuracy": report["accuracy"]["pruned"],
                            "seconds": report["seconds"],
                            # --structure, --quantize: ONNX Runtime latency (batch 1), speed-up
                            "latency_ms": report.get("latency", {}).get("latency_ms"),
                            "speedup": report.get("latency", {}).get("speedup"),
                        },
                    )
                if on_cell is not None:
                    on_cell(name, cached)
                expected = {"model": absolute_model(base.model),
                            "schedule": base.schedule.kind,
                            "pruner": pruner, "sparsity": sparsity, "seed": seed}  # fmt: skip
                rows.append(_read_cell(path, expected))
    write_results(rows, out, pruners, sparsities)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean, std = _mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


NOISE_MS = 0.1  # ONNX Runtime latencies below this (a toy model) are timer noise
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINES = ("-", "--", "-.", ":")


def _dense_ms(rows: list[dict[str, Any]]) -> float:
    """The dense model's latency, from each timed cell's latency and speed-up over it."""
    return statistics.fmean(r["latency_ms"] * r["speedup"] for r in rows)


def _latency_lines(rows: list[dict[str, Any]], pruners: Sequence[str],
                   sparsities: Sequence[float]) -> list[str]:  # fmt: skip
    """results.md's latency table: p50 ms at batch 1 and the speed-up over dense."""
    lines = ["", "ONNX Runtime latency at batch 1, ms (speed-up over the dense model), mean "
             "over seeds.", "", "| sparsity | " + " | ".join(pruners) + " |",
             "|---|" + "---|" * len(pruners)]  # fmt: skip
    for s in sparsities:
        cells = []
        for p in pruners:
            own = [r for r in rows if r["pruner"] == p and r["sparsity"] == s]
            ms = statistics.fmean(r["latency_ms"] for r in own)
            cells.append(f"{ms:.3f} ({statistics.fmean(r['speedup'] for r in own):.2f}x)")
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    dense_ms = _dense_ms(rows)
    if dense_ms < NOISE_MS:
        lines += ["", f"The dense model runs in {dense_ms:.3f} ms: below {NOISE_MS} ms the "
                  "timings are noise, and these speed-ups say nothing; time a larger "
                  "model."]  # fmt: skip
    return lines


def write_results(
    rows: list[dict[str, Any]], out: Path, pruners: Sequence[str], sparsities: Sequence[float]
) -> list[str]:
    """results.csv, results.md and the charts; the names of the files written."""
    with staged_file(out / "results.csv", force=True) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in COLUMNS} for row in rows)
    cells: dict[tuple[str, float], list[float]] = {(r["pruner"], r["sparsity"]): [] for r in rows}
    for r in rows:
        if r["accuracy"] is not None:  # unlabeled data has no accuracy
            cells[r["pruner"], r["sparsity"]].append(r["accuracy"] * 100)
    lines = [
        f"Test accuracy (%), mean ± std over {len({r['seed'] for r in rows})} seed(s); "
        f"{rows[0]['model']}, schedule {rows[0]['schedule']}.",
        "",
        "| sparsity | " + " | ".join(pruners) + " |",
        "|---|" + "---|" * len(pruners),
    ]
    for s in sparsities:
        means = [_cell(cells[p, s]) for p in pruners]
        lines.append(f"| {s:.0%} | " + " | ".join(means) + " |")
    dense = [r["accuracy_dense"] * 100 for r in rows if r.get("accuracy_dense") is not None]
    if dense:
        lines += ["", f"Dense model: {statistics.fmean(dense):.2f} %."]
    timed = all(r.get("latency_ms") is not None and r.get("speedup") for r in rows)
    if timed:
        lines += _latency_lines(rows, pruners, sparsities)
    with staged_file(out / "results.md", force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    written = ["results.csv", "results.md"]
    if all(cells.values()):
        _plot(cells, out / "accuracy_vs_sparsity.png", pruners, sparsities, rows)
        written.append("accuracy_vs_sparsity.png")
        if timed:
            _plot_latency(rows, out / "accuracy_vs_latency.png", pruners)
            written.append("accuracy_vs_latency.png")
    return written


@contextmanager
def _chart(path: Path, xlabel: str, title: str, columns: int = 1) -> Iterator[Any]:
    """An accuracy chart's axes; on leaving, labelled and written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=columns)
        fig.tight_layout()
        with staged_file(path, force=True) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)


def _plot(
    cells: dict,
    path: Path,
    pruners: Sequence[str],
    sparsities: Sequence[float],
    rows: list[dict[str, Any]],
) -> None:
    title = f"{rows[0]['model']} ({rows[0]['schedule']})"
    gap = min((b - a for a, b in itertools.pairwise(sorted(sparsities))), default=0.1)
    with _chart(path, "sparsity (%)", title, columns=2) as ax:
        for k, pruner in enumerate(pruners):
            # each pruner a little aside, with its own marker and line: equal series stay seen
            shift = (k - (len(pruners) - 1) / 2) * 100 * gap * 0.04
            stats = [_mean_std(cells[pruner, s]) for s in sparsities]
            ax.errorbar(
                [s * 100 + shift for s in sparsities],
                [m for m, _ in stats],
                yerr=[sd for _, sd in stats],
                marker=MARKERS[k % len(MARKERS)],
                linestyle=LINES[k % len(LINES)],
                capsize=3,
                label=pruner,
            )
        dense = [r["accuracy_dense"] for r in rows if r.get("accuracy_dense") is not None]
        if dense:
            ax.axhline(100 * statistics.fmean(dense), color="grey", linestyle="--",
                       label="dense")  # fmt: skip


def _plot_latency(rows: list[dict[str, Any]], path: Path, pruners: Sequence[str]) -> None:
    """Accuracy against ONNX Runtime latency (batch 1), one line per pruner, each point
    labelled with its sparsity."""
    dense = rows[0]
    dense_ms = _dense_ms(rows)
    noise = f" (dense {dense_ms:.3f} ms: timer noise)" if dense_ms < NOISE_MS else ""
    title = f"{dense['model']}: accuracy against latency{noise}"
    with _chart(path, "ONNX Runtime latency, batch 1 (ms)", title) as ax:
        for k, pruner in enumerate(pruners):
            own = sorted((r for r in rows if r["pruner"] == pruner), key=lambda r: r["latency_ms"])
            xs, ys = [r["latency_ms"] for r in own], [100 * r["accuracy"] for r in own]
            ax.plot(xs, ys, marker=MARKERS[k % len(MARKERS)], linestyle=LINES[k % len(LINES)],
                    label=pruner)  # fmt: skip
            for r, x, y in zip(own, xs, ys, strict=True):
                ax.annotate(f"{r['sparsity']:.0%}", (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)  # fmt: skip
        ax.axhline(100 * dense["accuracy_dense"], color="grey", linestyle="--", label="dense")


def cell_runner(
    base: PruneConfig, pruners: Sequence[str], sparsities: Sequence[float]
) -> Callable[[PruneConfig], dict[str, Any]]:
    """Check the grid before any work; return the function that runs one cell.

    ``--param`` values go to the pruners that accept them; one no pruner accepts is an error.
    """
    from prunekit.pruners import registry
    from prunekit.run.pipeline import check, execute

    if not pruners or not sparsities:
        raise UsageError("--pruners, --sparsities and --seeds each need at least one value")
    accepted = {name: {p.name for p in registry.load(name).params} for name in pruners}
    unused = sorted(k for k in base.params if not any(k in a for a in accepted.values()))
    if unused:
        raise UsageError(f"--param {', '.join(unused)}: none of the pruners accepts it")
    for level in sparsities:
        check(dataclasses.replace(base, sparsity=level))

    def one_cell(config: PruneConfig) -> dict[str, Any]:
        own = {k: v for k, v in config.params.items() if k in accepted[config.pruner]}
        timed = bool(config.structure or config.quantize)
        exports = ("onnx",) if timed else ()  # keeps the dense model to time
        outcome = execute(dataclasses.replace(config, params=own, exports=exports))
        if config.quantize and outcome.dense_model is not None:
            outcome.report["latency"] = quantized_speedup(config, outcome)
        elif config.structure and outcome.dense_model is not None:
            from prunekit.validate.onnx_runtime import speedup_of

            outcome.report["latency"] = speedup_of(
                outcome.model, outcome.dense_model, outcome.data.input_shape
            )
        return outcome.report

    return one_cell


def quantized_speedup(config: PruneConfig, outcome: Any) -> dict[str, float]:
    """ONNX Runtime p50 latency at batch 1 of the cell's quantized export and of the dense
    FP32 model, timed interleaved; and the speed-up."""
    import tempfile

    from prunekit.formats.onnx_file import export_onnx
    from prunekit.run.exports import write_quantized_onnx
    from prunekit.run.quantized import calibration_batches, quantize_mode
    from prunekit.validate.onnx_runtime import speedup_of_files

    assert config.quantize is not None and outcome.quantized is not None
    data = outcome.data
    mode = quantize_mode(data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        name, _ = write_quantized_onnx(
            folder, outcome.model, data.input_shape, {}, config.quantize, mode,
            outcome.quantized, calibration_batches(data) if mode == "static" else None,
        )  # fmt: skip
        export_onnx(outcome.dense_model, data.input_shape, folder / "dense.onnx", {}, sparse=False)
        return speedup_of_files(folder / name, folder / "dense.onnx", data.input_shape)
