"""Live-path benchmark: a clip played in real time through the whole engine (file source paced at
its media rate, camera path from the same file), measuring RTF, end-to-end latency and the RSS
of every node process over time.

    python scripts/bench_live.py --seconds 60              # short default
    python scripts/bench_live.py --seconds 600             # the issue's 10-minute number

The clip loops a generated 2-instrument SynthMUSIC ensemble (or --clip FILE) to --seconds.
Latency is reported in two parts: measured (compute + queueing, from the source's emit of the
audio that completes a step to the WAV sink) and algorithmic (STFT frame + block + lookahead +
source block), which no implementation can remove.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the repository packages



def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MB (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def looped_clip(clip: Path, seconds: float, out: Path) -> Path:
    """``clip`` repeated to ``seconds`` (ffmpeg stream loop, no re-encode of the audio)."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(clip),
                    "-t", str(seconds), "-c", "copy", str(out)], check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a JSON report."""
    import run_engine
    from engine.launcher import Launcher

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="audio duration (default 60)")
    ap.add_argument("--clip", default=None, help="media file to loop (default: the demo clip)")
    ap.add_argument("--bundle", default=str(ROOT / "models" / "checkpoints" / "cpu"))
    ap.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--lookahead", type=int, default=None)
    ap.add_argument("--warmup", type=float, default=20.0,
                    help="seconds after which memory growth is measured (default 20)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="iq-bench-"))
    clip = Path(args.clip) if args.clip else run_engine.demo_clip(run_engine.CACHE / "demo")
    clip = looped_clip(clip, args.seconds, work / "clip.mkv")
    bundle, info, random_bundle = run_engine.bundle_info(args.bundle)
    ns = run_engine.build_parser().parse_args([
        "--input", str(clip), "--out", str(work / "sep"), "--realtime", "--backend", args.backend,
        *(["--block", str(args.block)] if args.block else []),
        *(["--lookahead", str(args.lookahead)] if args.lookahead is not None else [])])
    run_dir = work / "run"
    run_dir.mkdir()
    toml = run_engine.default_graph(ns, bundle, info, run_dir,
                                    {"kind": "file", "path": str(clip)}, str(clip), live=False)
    import tomllib

    from engine.graph import parse_graph

    launcher = Launcher(parse_graph(tomllib.loads(toml), str(run_dir)), run_dir)
    launcher.start()
    samples: list[tuple[float, dict[str, float]]] = []
    t0 = time.monotonic()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(2.0):
            rss = {n: rss_mb(p.proc.pid) for n, p in launcher.nodes.items() if p.proc}
            samples.append((time.monotonic() - t0, {n: v for n, v in rss.items() if v}))

    threading.Thread(target=sample, daemon=True).start()
    result = launcher.run(timeout=args.seconds * 3 + 120)
    stop.set()
    block = ns.block or info["stream"]["block"]
    lookahead = info["stream"]["lookahead"] if ns.lookahead is None else ns.lookahead
    summary = run_engine.make_summary(result, run_dir, work / "sep", args.seconds, block,
                                      lookahead, {})
    after = [s for s in samples if s[0] >= args.warmup]
    growth = {}
    if len(after) >= 2:
        for node in after[0][1]:
            if node in after[-1][1]:
                growth[node] = round(after[-1][1][node] - after[0][1][node], 1)
    report = {
        "seconds": args.seconds, "bundle": str(bundle), "random_bundle": random_bundle,
        "backend": args.backend, "block": block, "lookahead": lookahead,
        "instruments": [i["label"] for i in summary["instruments"]],
        "reason": result["reason"],
        "rtf_separator": summary["timings"]["rtf"],
        "latency_measured_ms": summary["timings"]["end_to_end_ms"],
        "latency_algorithmic_ms": summary["timings"]["algorithmic_ms"],
        "compute_ms": summary["timings"]["compute_ms"],
        "rss_mb_after_warmup": after[0][1] if after else None,
        "rss_mb_end": after[-1][1] if after else None,
        "rss_growth_mb": growth,
        "rss_growth_mb_total": round(sum(growth.values()), 1),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["reason"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
