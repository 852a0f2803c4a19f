"""``--plot out.png``: latency percentiles and KV usage over (virtual) time.

Three panels: TTFT and TPOT percentiles (p50, p90, p99) over a sliding
window of requests by arrival time, and KV blocks in use with the running
and waiting counts per step. matplotlib with the Agg backend (no display).
"""

from __future__ import annotations

from fnllm.sim.report import percentile


def _windowed(points: list[tuple[float, float]], window: int):
    """(x, p50, p90, p99) over consecutive windows of ``window`` points."""
    out = []
    for i in range(0, len(points), window):
        chunk = points[i : i + window]
        ys = [y for _, y in chunk]
        out.append((chunk[len(chunk) // 2][0], percentile(ys, 50), percentile(ys, 90), percentile(ys, 99)))
    return out


def plot(res, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((res.arrival[r], r) for r in res.finish if r in res.first_token)
    ttft = [(t, res.first_token[r] - t) for t, r in done]
    tpot = [(t, (res.finish[r] - res.first_token[r]) / (res.output_len[r] - 1)) for t, r in done if res.output_len[r] > 1]
    window = max(1, len(done) // 50)
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for ax, pts, name in ((axes[0], ttft, "TTFT (s)"), (axes[1], tpot, "TPOT (s)")):
        w = _windowed(pts, window)
        if w:
            xs = [p[0] for p in w]
            for k, label in ((1, "p50"), (2, "p90"), (3, "p99")):
                ax.plot(xs, [p[k] for p in w], label=label)
        ax.set_ylabel(name)
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    ax = axes[2]
    if res.series:
        ts = [s[0] for s in res.series]
        nb = res.config.cache.num_blocks
        ax.plot(ts, [s[1] / nb for s in res.series], label="KV usage", color="tab:red")
        ax.set_ylabel("KV blocks in use (fraction)")
        ax.set_ylim(0, 1.05)
        ax2 = ax.twinx()
        ax2.plot(ts, [s[2] for s in res.series], label="running", color="tab:blue", alpha=0.6)
        ax2.plot(ts, [s[3] for s in res.series], label="waiting", color="tab:gray", alpha=0.6)
        ax2.set_ylabel("sequences")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_xlabel("time (s, by request arrival for latencies)")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
