"""OUT/chart.png: requests/s at saturation and p99 latency (saturation and fixed rate) per target.

Needs matplotlib (bench/run.sh puts it in the bench venv); without it the chart is recorded as a
failure and the report is written all the same.
"""

from datetime import datetime, timezone

from .config import CONNS, DURATION, OUT, THREADS
from .results import FAILURES, RESULTS


def chart():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        FAILURES.append(f"chart: matplotlib not importable ({e})")
        return False
    sat = [r for r in RESULTS if r["load"] == "saturation"]
    fixed = {r["target"]: r for r in RESULTS if r["load"] == "fixed rate"}
    if not sat:
        return False
    names = [r["target"] for r in sat]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.6 * len(names) + 2))
    y = range(len(names))
    axes[0].barh(list(y), [r["rps"] for r in sat], color="#4c72b0")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("requests/s at saturation (log)")
    for i, r in enumerate(sat):
        axes[0].text(r["rps"], i, f" {r['rps']:,.0f}", va="center", fontsize=8)
    axes[0].set_yticks(list(y))
    axes[0].set_yticklabels(names)
    axes[0].invert_yaxis()
    h = 0.4
    axes[1].barh([i - h / 2 for i in y], [r["p99_us"] / 1000 for r in sat], h, label="saturation",
                 color="#dd8452")
    axes[1].barh([i + h / 2 for i in y], [fixed[n]["p99_us"] / 1000 if n in fixed else 0 for n in names],
                 h, label="fixed rate (rate shown)", color="#55a868")
    for i, r in enumerate(sat):
        axes[1].text(r["p99_us"] / 1000, i - h / 2, f" {r['p99_us'] / 1000:.1f}", va="center", fontsize=7)
        if r["target"] in fixed:
            f = fixed[r["target"]]
            axes[1].text(f["p99_us"] / 1000, i + h / 2,
                         f" {f['p99_us'] / 1000:.1f} @ {f['rps']:,.0f}/s", va="center", fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("p99 latency, ms (log)")
    axes[1].set_yticks(list(y))
    axes[1].set_yticklabels([])
    axes[1].invert_yaxis()
    axes[1].legend()
    fig.suptitle(f"knoxgate bench, {datetime.now(timezone.utc).strftime('%Y-%m-%d')}, 2 shared cores "
                 f"(wrk -t{THREADS} -c{CONNS}, {DURATION}s)")
    fig.tight_layout()
    fig.savefig(OUT / "chart.png", dpi=110)
    return True
