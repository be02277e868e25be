"""PNG artifacts of a run: what a failing comparison looks like, and training curves against their band.

matplotlib is optional: without it the functions return ``None`` and the run goes on.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import Comparison


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_comparison(comparison: Comparison, title: str, path: str) -> str | None:
    """Engine vs trainer probability scatter and the log-ratio histogram of one comparison."""
    plt = _pyplot()
    engine, trainer = comparison.pairs
    if plt is None or not engine:
        return None
    ratio = [e - t for e, t in zip(engine, trainer)]
    fig, (scatter, hist) = plt.subplots(1, 2, figsize=(11, 4.5))
    scatter.scatter([math.exp(t) for t in trainer], [math.exp(e) for e in engine], s=6, alpha=0.6)
    scatter.plot([0, 1], [0, 1], color="gray", linewidth=0.8, label="y = x")
    corr = comparison.stats.get("prob_correlation", float("nan"))
    scatter.set(xlabel="trainer probability", ylabel="engine probability", xlim=(0, 1), ylim=(0, 1),
                title=f"per-token probability (corr {corr:.4f}, n={len(engine)})")
    scatter.legend(loc="upper left")
    hist.hist(ratio, bins=60, color="tab:orange")
    hist.axvline(0.0, color="gray", linewidth=0.8)
    bound = comparison.tolerance.max_abs
    if bound is not None:
        for x in (-bound, bound):
            hist.axvline(x, color="tab:red", linestyle="--", linewidth=0.8)
    hist.set(xlabel="log(engine / trainer) per token", ylabel="tokens", yscale="log",
             title=f"log-ratio: mean {comparison.stats.get('mean_offset', 0):+.3g}, max |.| {comparison.stats.get('max_abs', 0):.3g}")
    broken = "; ".join(comparison.violations)
    fig.suptitle(title[-110:] + (f"\nout of tolerance: {broken[:130]}" if broken else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_curves(
    curves: dict[str, list[float]], golden: dict[str, list[float]] | None, bands: dict[str, float], path: str
) -> str | None:
    """Each metric per training step against its golden band."""
    plt = _pyplot()
    names = [n for n in curves if n != "step"]
    if plt is None or not names:
        return None
    rows = (len(names) + 2) // 3
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps = list(range(len(curves[name])))
        ax.plot(steps, curves[name], marker="o", label="this run")
        if golden and name in golden:
            ref = golden[name][: len(steps)]
            band = bands.get(name, 0.0)
            ax.plot(steps[: len(ref)], ref, color="gray", label="golden")
            ax.fill_between(steps[: len(ref)], [r - band for r in ref], [r + band for r in ref], color="gray", alpha=0.25)
        ax.set_title(name + (f" (band ±{bands[name]:g})" if name in bands else ""))
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
