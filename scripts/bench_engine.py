"""Benchmark of the runtime: one ZeroMQ hop, and the identity graph on a 30 s file.

    .venv/bin/python scripts/bench_engine.py [--seconds 30] [--hops 2000] [--no-realtime]

1. Hop: 64 KB AudioChunks (16384 float32) ping-ponged between two processes over ipc and tcp
   loopback with the engine's Sender/Receiver (codec included); one hop = round trip / 2.
2. Identity graph (FileSource -> STFT -> IdentitySeparator -> OverlapAdd -> WavSink), as fast
   as possible: real-time factor = streaming time / media time, where streaming time runs
   from the source's first chunk to the sink's last (process start-up reported apart).
3. The same graph paced in real time: per-node compute and queueing, end-to-end latency
   (compute + queueing only; the algorithmic part is printed beside it).
All numbers come from one run, so their ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io.wavfile as wavfile
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.launcher import launch  # noqa: E402  (after the sys.path line, so it runs from scripts/)
from engine.messages import AudioChunk  # noqa: E402
from engine.profiler import format_summary  # noqa: E402
from engine.transport import Receiver, Sender  # noqa: E402

SR = 11025
GRAPH = """
[graph]
name = "bench"
[nodes.source]
class = "nodes.sources:FileSource"
params = {{ path = "{{graph_dir}}/in.wav", block = 1024, realtime = {realtime} }}
[nodes.stft]
class = "nodes.stft:STFT"
params = {{ block = 4 }}
[nodes.sep]
class = "nodes.identity_separator:IdentitySeparator"
[nodes.ola]
class = "nodes.overlap_add:OverlapAdd"
[nodes.sink]
class = "nodes.sinks:WavSink"
params = {{ out_dir = "{{graph_dir}}/sep" }}
[[edges]]
from = "source.audio"
to = "stft.audio"
[[edges]]
from = "stft.spec"
to = "sep.spec"
[[edges]]
from = "sep.masks"
to = "ola.masks"
[[edges]]
from = "ola.audio"
to = "sink.audio"
"""


def _echo(ep_in: str, ep_out: str, n: int) -> None:
    ctx = zmq.Context()
    rx = Receiver(ctx, "pull", [ep_in], bind_endpoint=True)
    tx = Sender(ctx, "push", [ep_out], bind_endpoint=False)
    done = 0
    while done < n:
        for msg in rx.recv(1000):
            tx.send(msg)
            done += 1
    rx.close()
    tx.close()
    ctx.term()


def bench_hop(transport: str, n: int, tmp: str) -> dict[str, float]:
    """Median / p99 one-way time (ms) of a 64 KB message, codec included."""
    if transport == "ipc":
        ep_a, ep_b = f"ipc://{tmp}/a", f"ipc://{tmp}/b"
    else:
        import socket

        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        ep_a, ep_b = (f"tcp://127.0.0.1:{p}" for p in ports)
    warm = 100
    proc = mp.get_context("spawn").Process(target=_echo, args=(ep_a, ep_b, n + warm))
    proc.start()
    ctx = zmq.Context()
    rx = Receiver(ctx, "pull", [ep_b], bind_endpoint=True)
    tx = Sender(ctx, "push", [ep_a], bind_endpoint=False)
    samples = np.random.default_rng(0).standard_normal(16384).astype(np.float32)  # 64 KB
    rtts = []
    for i in range(n + warm):
        t0 = time.perf_counter()
        tx.send(AudioChunk(stream="b", sample_index=i, samples=samples))
        while not rx.recv(1000):
            pass
        if i >= warm:
            rtts.append(time.perf_counter() - t0)
    proc.join(10)
    rx.close()
    tx.close()
    ctx.term()
    one_way = np.asarray(rtts) / 2 * 1e3
    return {"p50_ms": float(np.median(one_way)), "p99_ms": float(np.percentile(one_way, 99))}


def bench_graph(seconds: float, realtime: bool, tmp: Path) -> dict:
    """Run the identity graph on a ``seconds`` long file; return the launcher summary + RTF."""
    d = tmp / ("rt" if realtime else "fast")
    d.mkdir()
    x = (0.3 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype(np.float32)
    wavfile.write(d / "in.wav", SR, x)
    (d / "g.toml").write_text(GRAPH.format(realtime=str(realtime).lower()))
    t0 = time.monotonic()
    summary = launch(d / "g.toml", d / "run", timeout=seconds * 3 + 120)
    wall = time.monotonic() - t0
    trails = json.loads((d / "run" / "sink.stats.json").read_text())["trails"]
    first = min(t[0][1] for t in trails)
    last = max(t[-1][2] for t in trails)
    _, y = wavfile.read(d / "sep" / "mix.wav")
    summary.update(
        wall_incl_startup_s=wall, streaming_s=last - first, rtf=(last - first) / seconds,
        startup_s=first - t0, max_abs_error=float(np.abs(y - x).max()) if y.shape == x.shape
        else float("nan"),
    )
    return summary


def main() -> int:
    """Run every benchmark and print one report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the test file")
    ap.add_argument("--hops", type=int, default=2000, help="round trips per transport")
    ap.add_argument("--no-realtime", action="store_true", help="skip the paced run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="iq-bench-") as tmp:
        print(f"cpu cores: {os.cpu_count()}; load average: {os.getloadavg()}")
        hops = {t: bench_hop(t, args.hops, tmp) for t in ("ipc", "tcp")}
        for t, h in hops.items():
            print(f"hop 64 KB {t}: p50 {h['p50_ms']:.3f} ms, p99 {h['p99_ms']:.3f} ms")
        fast = bench_graph(args.seconds, False, Path(tmp))
        print(f"\nidentity graph, {args.seconds:.0f} s file as fast as possible: streaming "
              f"{fast['streaming_s']:.2f} s -> real-time factor {fast['rtf']:.4f} "
              f"({1 / fast['rtf']:.0f}x real time); process start-up {fast['startup_s']:.2f} s; "
              f"max |out - in| {fast['max_abs_error']:.2e}")
        print(format_summary(fast["latency"]))
        stft_p50 = fast["latency"]["compute"]["stft"]["p50"]
        print(f"ratio hop(ipc) / stft compute per 1024-sample chunk: "
              f"{hops['ipc']['p50_ms'] / stft_p50:.2f}")
        if not args.no_realtime:
            rt = bench_graph(args.seconds, True, Path(tmp))
            print(f"\nidentity graph paced in real time ({args.seconds:.0f} s): per node (ms)")
            print(format_summary(rt["latency"]))
            algo_ms = (1022 + 3 * 256) / SR * 1e3
            print(f"algorithmic latency (not in the trail): source block 1024 samples = "
                  f"{1024 / SR * 1e3:.1f} ms, STFT frame + 4-frame block = {algo_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
