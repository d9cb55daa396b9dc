"""Human-readable output of reports and validations (the --json forms are the dicts)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from prunekit.cli.common import console


def print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['model']} pruned with {report['pruner']} ({report['mask']} mask)")
    table.add_column("tensor")
    table.add_column("sparsity", justify="right")
    for name, fraction in report["sparsity"]["per_tensor"].items():
        table.add_row(name, f"{fraction:.1%}")
    sparsity, acc = report["sparsity"], report["accuracy"]
    structure = report.get("structure")
    table.add_section()
    if structure:  # --structure: the request is a fraction of channels, not of weights
        table.add_row("channels removed", f"{structure['removed']:.1%} (asked "
                      f"{sparsity['target']:.1%})")  # fmt: skip
    elif sparsity.get("own"):  # --layer-sparsity: -s is the others' sparsity
        own, every = len(sparsity["own"]), len(sparsity["own"]) == len(sparsity["per_tensor"])
        asked = "every tensor" if every else f"{own} by --layer-sparsity, the others asked "
        asked += "by --layer-sparsity" if every else f"{sparsity['target']:.1%}"
        table.add_row("all targets", f"{sparsity['achieved']:.1%} ({asked})")
    else:
        table.add_row("all targets", f"{sparsity['achieved']:.1%} (asked {sparsity['target']:.1%})")
    console.print(table)
    if structure:
        params, flops = structure["parameters"], structure["flops_per_sample"]
        console.print(
            f"parameters {params['before']:,} -> {params['after']:,} "
            f"({1 - params['after'] / max(params['before'], 1):.1%} fewer); FLOPs per sample "
            f"{flops['before']:,} -> {flops['after']:,} "
            f"({1 - flops['after'] / max(flops['before'], 1):.1%} fewer)"
        )
    perplexity, fidelity = report.get("perplexity"), report.get("fidelity")
    if perplexity:
        console.print(
            f"held-out perplexity: dense {perplexity['dense']:.3f} -> pruned "
            f"{perplexity['pruned']:.3f}"
        )
    if fidelity:
        console.print(
            f"cosine to the dense model's outputs on the held-out split: mean "
            f"{fidelity['cosine_mean']:.4f}, 5th percentile {fidelity['cosine_p5']:.4f}"
        )
    if acc["dense"] is None and not fidelity:
        console.print("test accuracy: not measured (the data has no labels)")
    elif acc["dense"] is not None:
        console.print(f"test accuracy: dense {acc['dense']:.2%} -> pruned {acc['pruned']:.2%}")
    if "validation" in report:
        print_validation(report["validation"])
    console.print(f"wrote {', '.join(report['outputs'])} in {report['seconds']:.1f} s")


def print_validation(v: dict[str, Any]) -> None:
    session = v["session"]
    accuracy = "not measured (no labels)" if v["accuracy"] is None else f"{v['accuracy']:.2%}"
    baseline = v.get("baseline_accuracy")
    console.print(
        f"ONNX Runtime ({session['provider']}, intra-op threads "
        f"{session['intra_op_threads']}, {session['graph_optimization']}): accuracy "
        f"{accuracy}" + (f", baseline {baseline:.2%}" if baseline is not None else "")
    )
    if v.get("perplexity") is not None:
        base = v.get("baseline_perplexity")
        console.print(
            f"held-out perplexity (ONNX Runtime): {v['perplexity']:.3f}"
            + (f", baseline {base:.3f}" if base is not None else "")
        )
    if "parity" in v:
        p = v["parity"]
        console.print(
            f"parity with PyTorch: top-1 agreement {p['top1_agreement']:.2%}, max |diff| "
            f"{p['max_abs_diff']:.2e}, min cosine {p['cosine_min']:.6f} "
            f"({'ok' if p['passed'] else 'FAILED'})"
        )
    if "fidelity" in v:
        f = v["fidelity"]
        console.print(
            f"cosine similarity to {f['reference']}: mean {f['cosine_mean']:.4f}, "
            f"5th percentile {f['cosine_p5']:.4f}"
        )
    table = Table(title="latency (ms)")
    for column in ("model", "batch", "p50", "p90", "p99", "samples/s"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for label, per_batch in v["latency"].items():
        for batch, m in per_batch.items():
            table.add_row(
                label,
                batch,
                f"{m['p50_ms']:.3f}",
                f"{m['p90_ms']:.3f}",
                f"{m['p99_ms']:.3f}",
                f"{m['throughput_per_s']:,.0f}",
            )
    console.print(table)
    if "latency_ratio" in v:
        ratios = ", ".join(f"batch {b}: {r:.2f}" for b, r in v["latency_ratio"].items())
        console.print(f"p50 latency pruned / dense: {ratios}")
        speedups = ", ".join(f"batch {b}: {r:.2f}x" for b, r in v["speedup"].items())
        console.print(f"speed-up over the dense baseline: {speedups}")
    console.print(f"note: {v['note']}")
