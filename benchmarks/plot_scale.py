"""Draw benchmarks/results/scale-*.json (every build found) as one PNG.

Needs matplotlib (pip install 'qsbr[plot]'). Run: python benchmarks/plot_scale.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(results: Path) -> Path:
    files = sorted(results.glob("scale-*.json"))
    fig, (ax_poll, ax_sync) = plt.subplots(1, 2, figsize=(12, 4.8))
    for f in files:
        data = json.loads(f.read_text())
        kind = "free-threaded" if "GIL disabled" in data["machine"]["build"] else "GIL"
        build = f"{data['machine']['python']} {kind}"
        for strategy, style in (("flat", "--"), ("incremental", "-")):
            rows = [r for r in data["rows"] if r["strategy"] == strategy]
            xs = [r["threads"] for r in rows]
            ax_poll.plot(
                xs, [r["poll_p99_us"] for r in rows], style, marker="o", label=f"{strategy}, {build}"
            )
            ax_sync.plot(
                xs, [r["sync_median_ms"] for r in rows], style, marker="o", label=f"{strategy}, {build}"
            )
    for ax, title, unit in (
        (ax_poll, "poll() p99 latency", "microseconds"),
        (ax_sync, "synchronize() median latency", "milliseconds"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("attached threads")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = results / "scale.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    print(plot(folder))
