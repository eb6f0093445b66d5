"""``--plot FILE.png``: latency distributions and throughput over time, drawn with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise RuntimeError("--plot needs matplotlib: pip install 'servekit[bench]'") from error


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = [i for i, error in enumerate(report["errors"]) if not error]
    ttft = [report["ttfts"][i] * 1000 for i in ok]
    e2el = [report["e2els"][i] * 1000 for i in ok]
    itl = [v * 1000 for i in ok for v in report["itls"][i]]
    tpot = [
        (report["e2els"][i] - report["ttfts"][i]) * 1000 / (report["output_lens"][i] - 1)
        for i in ok
        if report["output_lens"][i] > 1
    ]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for axis, values, title in (
        (axes[0][0], ttft, "TTFT (ms)"),
        (axes[0][1], tpot, "TPOT (ms)"),
        (axes[0][2], itl, "ITL (ms)"),
        (axes[1][0], e2el, "End-to-end latency (ms)"),
    ):
        axis.hist(values or [0.0], bins=30, color="#4472c4")
        axis.set_title(title)
        axis.set_ylabel("requests" if title != "ITL (ms)" else "intervals")
    # Output tokens per second over time: each request's tokens spread over its content chunks.
    duration = max(report["duration"], 1e-9)
    bins = max(10, min(60, int(duration * 2)))
    width = duration / bins
    per_bin = [0.0] * bins
    for i in ok:
        times = report["chunk_times"][i]
        if not times:
            continue
        share = report["output_lens"][i] / len(times)
        for t in times:
            per_bin[min(bins - 1, int(t / width))] += share / width
    axes[1][1].plot([(b + 0.5) * width for b in range(bins)], per_bin, color="#ed7d31")
    axes[1][1].set_title("Output throughput (tok/s)")
    axes[1][1].set_xlabel("time (s)")
    starts = sorted(report["start_times"])
    axes[1][2].step(starts, range(1, len(starts) + 1), where="post", color="#70ad47")
    axes[1][2].set_title("Requests started")
    axes[1][2].set_xlabel("time (s)")
    figure.suptitle(
        f"{report.get('model')} · {report['completed']} ok, {report['failed']} failed · "
        f"{report['output_throughput']:.1f} output tok/s"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
