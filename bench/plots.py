"""The benchmark's plots (matplotlib, no display needed): latency CDF and burst throughput."""

from __future__ import annotations

from pathlib import Path


def draw(series: dict, out_dir: Path, *, quick: bool = False) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = "-quick" if quick else ""
    written = []
    steady = series.get("steady") or {}
    if steady:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("zoom_to_teams_ms", "Zoom → Teams"), ("teams_to_zoom_ms", "Teams → Zoom")):
            values = sorted(steady.get(key) or [])
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=f"{label} (n={len(values)})")
        ax.axvline(250, color="grey", linestyle=":", linewidth=1)
        ax.axvline(500, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("latency: arrival at our endpoint → write completed at the other vendor (ms)")
        ax.set_ylabel("fraction of changes")
        ax.set_title("Steady load: latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out_dir / f"latency-cdf{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    burst = series.get("burst") or {}
    if burst:
        fig, ax = plt.subplots(figsize=(7, 4))
        end = max([0.0] + [max(v) for v in burst.values() if v])
        buckets = int(end) + 2
        lines = (("zoom_arrivals_s", "Zoom changes arriving"), ("teams_arrivals_s", "Teams changes arriving"),
                 ("graph_writes_s", "Graph writes (Zoom → Teams)"), ("zoom_puts_s", "Zoom PUTs (Teams → Zoom)"))
        for key, label in lines:
            values = burst.get(key) or []
            counts = [0] * buckets
            for v in values:
                counts[max(0, int(v))] += 1
            ax.plot(range(buckets), counts, label=label, drawstyle="steps-post")
        ax.set_xlabel("seconds since the first change arrived")
        ax.set_ylabel("per second")
        ax.set_title("Top-of-the-hour burst: throughput")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out_dir / f"burst-throughput{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
