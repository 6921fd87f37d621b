"""Latency statistics from the timing trails that messages carry.

A trail is ``[(node, t_in, t_out), ...]`` in ``time.monotonic()`` seconds, one entry per node in
path order, the last one stamped by the sink. From it: a node's compute time (t_out - t_in),
the queueing before a node (its t_in minus the previous node's t_out: socket, queue and poll
time), and end-to-end latency (sink's t_out minus the source's t_in). This is the compute +
queueing part of the latency only: algorithmic latency (window, lookahead, block) and device
buffers are not in a trail and must be reported beside it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 95, 99)


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max in milliseconds of durations given in seconds (n = count)."""
    if len(values_s) == 0:
        return {"n": 0}
    v = np.asarray(values_s, dtype=np.float64) * 1e3
    out: dict[str, float] = {f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}
    out.update(mean=float(v.mean()), max=float(v.max()), n=int(v.size))
    return out


def summarize(trails: Iterable[Sequence[Sequence[Any]]]) -> dict[str, Any]:
    """Per-node compute, per-node queueing and end-to-end latency percentiles (ms).

    Returns ``{"compute": {node: stats}, "queue": {node: stats}, "end_to_end": stats,
    "paths": {"a>b>c": count}}``.
    """
    compute: dict[str, list[float]] = defaultdict(list)
    queue: dict[str, list[float]] = defaultdict(list)
    e2e: list[float] = []
    paths: dict[str, int] = defaultdict(int)
    for trail in trails:
        if not trail:
            continue
        prev_out = None
        for node, t_in, t_out in trail:
            compute[node].append(t_out - t_in)
            if prev_out is not None:
                queue[node].append(t_in - prev_out)
            prev_out = t_out
        e2e.append(trail[-1][2] - trail[0][1])
        paths[">".join(str(h[0]) for h in trail)] += 1
    return {
        "compute": {n: percentiles_ms(v) for n, v in compute.items()},
        "queue": {n: percentiles_ms(v) for n, v in queue.items()},
        "end_to_end": percentiles_ms(e2e),
        "paths": dict(paths),
    }


def format_summary(stats: dict[str, Any]) -> str:
    """A small fixed-width table of the summary (ms)."""
    lines = [f"{'node':<20} {'compute p50':>11} {'p95':>8} {'p99':>8} {'queue p50':>10} {'p95':>8}"]
    for node, c in stats["compute"].items():
        q = stats["queue"].get(node, {})
        lines.append(
            f"{node:<20} {c.get('p50', 0):>11.3f} {c.get('p95', 0):>8.3f} {c.get('p99', 0):>8.3f}"
            f" {q.get('p50', 0):>10.3f} {q.get('p95', 0):>8.3f}"
        )
    e = stats["end_to_end"]
    if e.get("n"):
        lines.append(f"end-to-end (compute + queueing) p50 {e['p50']:.3f} p95 {e['p95']:.3f} "
                     f"p99 {e['p99']:.3f} ms over {e['n']} messages")
    return "\n".join(lines)
