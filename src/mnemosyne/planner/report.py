"""Planner output: the ranked table, JSON rows, and the PNG of predicted TTFT against GPU count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mnemosyne.planner.search import Verdict

PREDICTED = "predicted by `mnemosyne plan` (not measured)"


def format_tokens(n: int) -> str:
    """1048576 -> 1M, 262144 -> 256K (binary units, as --context reads them)."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def layout_name(v: Verdict) -> str:
    ly = v.prediction.candidate.layout
    return f"tp{ly.tp} pp{ly.pp} kvp{ly.kvp}"


def to_row(v: Verdict) -> dict[str, Any]:
    """One verdict as plain JSON values."""
    p, c = v.prediction, v.prediction.candidate
    ly = c.layout
    m = p.memory
    return {
        "num_gpus": c.num_gpus, "tp": ly.tp, "pp": ly.pp, "kvp": ly.kvp,
        "kvp_group_max_tokens": ly.kvp_group_max_tokens if ly.kvp > 1 else None,
        "step_budget_ms": None if c.step_budget_s is None else c.step_budget_s * 1e3,
        "chunking": c.chunking, "max_num_batched_tokens": c.max_num_batched_tokens,
        "context": p.context, "ttft_s": p.ttft_s, "ttft_no_spp_s": p.ttft_no_spp_s, "tbt_s": p.tbt_s,
        "max_prefill_step_s": p.max_step_s, "num_chunks": p.num_chunks, "prefill_mfu": p.prefill_mfu,
        "memory_gib": {"weights": m.weights / 2**30, "kv": m.kv / 2**30, "activations": m.activations / 2**30,
                       "reserved": m.reserved / 2**30, "total": m.total / 2**30, "capacity": m.capacity / 2**30},
        "fits": m.fits, "prefill_j_per_token": p.prefill_j_per_token, "decode_j_per_token": p.decode_j_per_token,
        "feasible": v.is_feasible, "reasons": list(v.reasons),
    }


def format_ranked(verdicts: Sequence[Verdict], top: int) -> str:
    head = (f"{'#':>3} {'layout':<16} {'L':>6} {'budget':>7} {'TTFT':>9} {'no SPP':>9} {'TBT':>8} "
            f"{'step max':>8} {'GiB/GPU':>7} {'MFU':>5} {'J/tok in':>8} {'J/tok out':>9}  verdict")
    lines = [head]
    for i, v in enumerate(verdicts[:top], 1):
        p, c = v.prediction, v.prediction.candidate
        ly = c.layout
        group = format_tokens(ly.kvp_group_max_tokens) if ly.kvp > 1 and ly.kvp_group_max_tokens else "-"
        budget = "-" if c.step_budget_s is None else f"{c.step_budget_s * 1e3:g}ms"
        lines.append(
            f"{i:>3} {layout_name(v):<16} {group:>6} {budget:>7} {_s(p.ttft_s):>9} {_s(p.ttft_no_spp_s):>9} "
            f"{p.tbt_s * 1e3:>6.1f}ms {p.max_step_s * 1e3:>6.0f}ms {p.memory.total / 2**30:>7.1f} "
            f"{p.prefill_mfu:>5.2f} {p.prefill_j_per_token:>8.3f} {p.decode_j_per_token:>9.2f}  "
            f"{'ok' if v.is_feasible else '; '.join(v.reasons)}")
    if len(verdicts) > top:
        lines.append(f"... {len(verdicts) - top} more (--top)")
    return "\n".join(lines)


def _s(seconds: float) -> str:
    return f"{seconds / 60:.1f}min" if seconds >= 600 else f"{seconds:.2f}s"


def format_sweep(best: Mapping[int, Verdict | None]) -> str:
    lines = [f"{'GPUs':>5} {'best layout':<16} {'TTFT':>9} {'TBT':>8} {'GiB/GPU':>7} {'MFU':>5} {'scaling':>7}"]
    base = next(((n, v) for n, v in best.items() if v is not None), None)
    for n, v in best.items():
        if v is None:
            lines.append(f"{n:>5} {'(none fits or meets the SLOs)':<16}")
            continue
        p = v.prediction
        eff = base[1].prediction.ttft_s * base[0] / (p.ttft_s * n) if base else float("nan")
        lines.append(f"{n:>5} {layout_name(v):<16} {_s(p.ttft_s):>9} {p.tbt_s * 1e3:>6.1f}ms "
                     f"{p.memory.total / 2**30:>7.1f} {p.prefill_mfu:>5.2f} {eff:>7.0%}")
    return "\n".join(lines)


def plot_ttft_vs_gpus(series: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, title: str,
                      efficiency: Mapping[str, Sequence[tuple[int, float]]] | None = None) -> None:
    """Log-log predicted TTFT against GPU count per series, dashed ideal (linear) scaling from each
    series' first point; a second panel of scaling efficiency when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if efficiency else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    ax = axes[0][0]
    for label, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        line = ax.plot(xs, ys, marker="o", label=label)[0]
        ax.plot(xs, [ys[0] * xs[0] / x for x in xs], linestyle="--", color=line.get_color(), alpha=0.4)
    ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="TTFT (s), predicted", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if efficiency:
        ax2 = axes[0][1]
        for label, points in efficiency.items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax2.plot(xs, [100 * y for y in ys], marker="o", label=label)
        ax2.axhline(80, color="grey", linestyle=":", label="paper: > 80% at 128 GPUs")
        ax2.plot([64], [85], marker="*", markersize=12, color="black", linestyle="", label="paper: 85% at 8 stages")
        ax2.set(xscale="log", xlabel="GPUs", ylabel="scaling efficiency (%), predicted", ylim=(0, 105),
                title="SPP scaling efficiency")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
    fig.text(0.01, 0.01, PREDICTED, fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
