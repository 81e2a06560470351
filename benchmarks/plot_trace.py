"""Draw pipeline traces (--trace-file JSON) as a PNG: one panel per trace, one row per
(kvp, stage) track, one bar per micro-batch, coloured by the request with the most tokens in it.

    python benchmarks/plot_trace.py docs/spp_trace.json docs/spp_trace_off.json -o docs/spp_trace.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load(path: Path) -> tuple[list[dict], dict[tuple[int, int], str], str]:
    """Slices, track names, and the trace's title (the file name)."""
    events = json.loads(path.read_text())["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    return [e for e in events if e["ph"] == "X"], names, path.stem


def _main_chunk(event: dict) -> tuple[str, int, int]:
    args = event["args"]
    parts = zip(args["request_ids"], args["starts"], args["num_new_tokens"], strict=True)
    return max(parts, key=lambda p: p[2])


def plot(paths: list[Path], out: Path, titles: list[str] | None) -> None:
    traces = [load(p) for p in paths]
    end_ms = max(max(e["ts"] + e["dur"] for e in slices) / 1e3 for slices, _, _ in traces)
    request_ids = sorted({_main_chunk(e)[0] for slices, _, _ in traces for e in slices})
    palette = plt.get_cmap("tab10")
    colours = {rid: palette(i % 10) for i, rid in enumerate(request_ids)}
    fig, axes = plt.subplots(len(traces), 1, figsize=(13, 1.2 + 1.1 * sum(len(t[1]) for t in traces)),
                             squeeze=False, sharex=True)
    for ax, (slices, names, stem), title in zip(axes[:, 0], traces, titles or [None] * len(traces), strict=True):
        tracks = sorted(names)
        for row, track in enumerate(tracks):
            for e in (e for e in slices if (e["pid"], e["tid"]) == track):
                rid, start, num_new = _main_chunk(e)
                x, width = e["ts"] / 1e3, e["dur"] / 1e3
                ax.broken_barh([(x, width)], (row - 0.4, 0.8), facecolor=colours[rid], edgecolor="black", lw=0.4)
                if num_new > 1 and width > end_ms / 60:
                    ax.text(x + width / 2, row, f"{start}+{num_new}", ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(tracks)), [f"kvp {k} · {names[(k, s)]}" for k, s in tracks])
        ax.invert_yaxis()
        ax.set_title(title or stem, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("time (ms); bars labelled with the largest chunk: start token + tokens")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[rid]) for rid in request_ids]
    fig.legend(handles, request_ids, loc="upper right", fontsize=8, ncol=len(request_ids))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--titles", nargs="*", default=None, help="one per trace (default: the file names)")
    args = parser.parse_args()
    plot(args.traces, args.output, args.titles)


if __name__ == "__main__":
    main()
