"""Live-path benchmark: a clip played in real time through the whole engine (file source paced at
its media rate, camera path from the same file), measuring RTF, capture-to-output latency and
the RSS of every node process over time.

    python scripts/bench_live.py --seconds 60                     # short default
    python scripts/bench_live.py --seconds 600                    # the issue's 10-minute number
    python scripts/bench_live.py --block 2 --lookahead 2          # other streaming settings
    python scripts/bench_live.py --analyze RUN_DIR                # latency of any earlier run
    python scripts/bench_live.py --virtual-mic --seconds 30       # PulseAudio null-sink mic

The clip loops a generated 2-instrument SynthMUSIC ensemble (or --clip FILE) to --seconds.
Latency is measured directly, per output sample: (when the WAV sink wrote it) - (when the same
input sample was captured: start + index / 11025 for the real-time file; the sound card's ADC
time for a microphone). Beside it: the algorithmic lower bound of the same settings (the
zero-compute chain: source block, centred STFT frame, separator block, lookahead, overlap-add;
run_engine.algorithmic_latency_ms), and the old trail figure (compute + queueing from the
source's emit to the sink).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
    """``clip`` repeated to ``seconds`` (ffmpeg stream loop, no re-encode)."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(clip),
                    "-t", str(seconds), "-c", "copy", str(out)], check=True)
    return out


def latency_report(run_dir: Path, skip_s: float) -> dict:
    """Measured capture-to-output latency (all samples, and after ``skip_s``) of a run dir."""
    import run_engine

    return {"all": run_engine.capture_latency_ms(run_dir, by_s=5.0),
            f"after_{skip_s:g}s": run_engine.capture_latency_ms(run_dir, skip_s=skip_s)}


def memory_report(samples: list[tuple[float, dict[str, float]]], warmup: float) -> dict:
    """RSS per node after warm-up and at the end, and the growth between them (MB)."""
    after = [s for s in samples if s[0] >= warmup and s[1]]
    if len(after) < 2:
        return {"note": f"run shorter than the warm-up ({warmup} s): no growth figure"}
    first = after[0][1]
    # Each node's last sample while it was alive: nodes end at slightly different times.
    last = {n: next(s[1][n] for s in reversed(after) if n in s[1]) for n in first}
    last_t = {n: next(s[0] for s in reversed(after) if n in s[1]) for n in first}
    growth = {n: round(last[n] - first[n], 1) for n in first}
    peak = {n: round(max(s[1].get(n, 0.0) for s in after), 1) for n in first}
    # The total every minute (nodes all alive), to see a trend rather than two points.
    minutes = [s for i, s in enumerate(after) if set(s[1]) == set(first) and i % 30 == 0]
    by_minute = [round(sum(s[1].values()), 1) for s in minutes]
    node_by_minute = {n: [round(s[1][n], 1) for s in minutes] for n in first}
    return {"from_s": round(after[0][0], 1), "to_s": {n: round(t, 1) for n, t in last_t.items()},
            "rss_mb_after_warmup": {n: round(v, 1) for n, v in first.items()},
            "rss_mb_end": {n: round(v, 1) for n, v in last.items()},
            "rss_mb_peak": peak, "growth_mb": growth,
            "growth_mb_total": round(sum(growth.values()), 1),
            "total_mb_after_warmup": round(sum(first.values()), 1),
            "total_mb_every_minute": by_minute, "node_mb_every_minute": node_by_minute}


def run_live(args: argparse.Namespace) -> dict:
    """One real-time run of the default graph on the looped clip; returns the report."""
    import tomllib

    import run_engine
    from engine.graph import parse_graph
    from engine.launcher import Launcher

    work = Path(tempfile.mkdtemp(prefix="iq-bench-"))
    clip = Path(args.clip) if args.clip else run_engine.demo_clip(run_engine.CACHE / "demo")
    clip = looped_clip(clip, args.seconds, work / "clip.mkv")
    bundle, info, random_bundle = run_engine.bundle_info(args.bundle)
    ns = run_engine.build_parser().parse_args([
        "--input", str(clip), "--out", str(work / "sep"), "--realtime", "--backend", args.backend,
        *(["--block", str(args.block)] if args.block else []),
        *(["--lookahead", str(args.lookahead)] if args.lookahead is not None else []),
        *(["--source-block", str(args.source_block)] if args.source_block else [])])
    # The same settings as run_engine.py --realtime: the live defaults unless given.
    run_engine.apply_stream_defaults(ns, info, run_engine.is_live_input(ns))
    block, lookahead, source_block = ns.block, ns.lookahead, ns.source_block
    run_dir = work / "run"
    run_dir.mkdir()
    spec = tomllib.loads(run_engine.default_graph(
        ns, bundle, info, run_dir, {"kind": "file", "path": str(clip)}, str(clip), live=False))
    launcher = Launcher(parse_graph(spec, str(run_dir)), run_dir)
    load_before = os.getloadavg()
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
    summary = run_engine.make_summary(result, run_dir, work / "sep", args.seconds, block,
                                      lookahead, {}, source_block=source_block)
    timings = summary["timings"]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
        "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": args.seconds, "bundle": str(bundle), "random_bundle": random_bundle,
        "backend": args.backend, "block": block, "lookahead": lookahead,
        "source_block": source_block,
        "instruments": [i["label"] for i in summary["instruments"]],
        "reason": result["reason"], "run_dir": str(run_dir),
        "rtf_separator": timings["rtf"], "rtf_wall": timings["rtf_wall"],
        "latency_capture_to_output_ms": latency_report(run_dir, args.warmup),
        "latency_algorithmic_ms": timings["algorithmic_ms"],
        "latency_trail_compute_queue_ms": timings["end_to_end_ms"],
        "compute_ms": timings["compute_ms"],
        "counters": {n: {k: v for k, v in c.items() if k in (
            "gap_samples", "gap_frames", "device_status", "dropped_chunks")}
            for n, c in summary["counters"].items()},
        "memory": memory_report(samples, args.warmup),
    }


def run_virtual_mic(args: argparse.Namespace) -> dict:
    """The live path through a real audio device: the clip's audio played into a PulseAudio null
    sink whose monitor is the microphone (``run_engine.py --input mic:pulse``), its video sent
    as an MPEG-TS stream over TCP (``--video tcp://``). Capture times are the sound card's ADC
    times (nodes.sources.MicSource)."""
    import socket

    import run_engine

    if subprocess.run(["pactl", "info"], capture_output=True, check=False).returncode != 0:
        subprocess.run(["pulseaudio", "-D", "--exit-idle-time=-1"], capture_output=True,
                       check=False)
        time.sleep(1.0)
    sink = f"iq_bench_{os.getpid()}"
    mod = subprocess.run(["pactl", "load-module", "module-null-sink", f"sink_name={sink}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="iq-vmic-"))
    clip = Path(args.clip) if args.clip else run_engine.demo_clip(run_engine.CACHE / "demo")
    clip = looped_clip(clip, args.seconds + 10, work / "clip.mkv")
    wav = work / "mix.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(clip), "-vn", "-ac", "1",
                    "-ar", "44100", str(wav)], check=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-i", str(clip), "-an",
                               "-c:v", "mpeg2video", "-f", "mpegts",
                               f"tcp://127.0.0.1:{port}?listen=1"], stdin=subprocess.DEVNULL),
             subprocess.Popen(["paplay", f"--device={sink}", str(wav)])]
    run_dir = work / "run"
    extra = [*(["--block", str(args.block)] if args.block else []),
             *(["--lookahead", str(args.lookahead)] if args.lookahead is not None else []),
             *(["--source-block", str(args.source_block)] if args.source_block else [])]
    load_before = os.getloadavg()
    try:
        time.sleep(1.0)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "run_engine.py"), "--input", "mic:pulse", "--video",
             f"tcp://127.0.0.1:{port}", "--out", str(work / "sep"), "--bundle", args.bundle,
             "--duration", str(args.seconds), "--run-dir", str(run_dir), *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=args.seconds + 180, check=False,
            env={**os.environ, "PULSE_SOURCE": f"{sink}.monitor"})
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["pactl", "unload-module", mod], capture_output=True, check=False)
    summary_path = work / "sep" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    timings = summary.get("timings", {})
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
        "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "mode": "virtual mic (PulseAudio null-sink monitor) + TCP video",
        "seconds": args.seconds, "bundle": args.bundle, "exit_code": proc.returncode,
        "stderr_tail": proc.stderr.strip().splitlines()[-3:],
        "instruments": [i["label"] for i in summary.get("instruments", [])],
        "settings": timings.get("algorithmic_ms", {}).get("settings"),
        "rtf_separator": timings.get("rtf"), "run_dir": str(run_dir),
        "latency_capture_to_output_ms": latency_report(run_dir, args.warmup),
        "latency_algorithmic_ms": timings.get("algorithmic_ms"),
        "counters": {n: {k: v for k, v in c.items() if k in (
            "capture_time_fallback", "device_status", "gap_samples")}
            for n, c in summary.get("counters", {}).items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or analyse a run dir) and print a JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="audio duration (default 60)")
    ap.add_argument("--clip", default=None, help="media file to loop (default: the demo clip)")
    ap.add_argument("--bundle", default=str(ROOT / "models" / "checkpoints" / "cpu"))
    ap.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--block", type=int, default=None,
                    help="separator block (frames; default: run_engine's live default)")
    ap.add_argument("--lookahead", type=int, default=None,
                    help="lookahead (frames; default: run_engine's live default)")
    ap.add_argument("--source-block", type=int, default=None,
                    help="samples per source chunk (default: run_engine's live default)")
    ap.add_argument("--warmup", type=float, default=20.0,
                    help="seconds after which memory growth and the warm latency count "
                         "(default 20)")
    ap.add_argument("--analyze", metavar="RUN_DIR", default=None,
                    help="only report the capture-to-output latency of an earlier run "
                         "(run_engine.py --run-dir RUN_DIR ...), e.g. a live microphone run")
    ap.add_argument("--virtual-mic", action="store_true",
                    help="run the live microphone path instead: the clip played into a "
                         "PulseAudio null sink, its monitor as the mic, video over TCP")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.virtual_mic:
        report = run_virtual_mic(args)
        ok = report["exit_code"] == 0
    elif args.analyze:
        report = {"run_dir": args.analyze,
                  "latency_capture_to_output_ms": latency_report(Path(args.analyze),
                                                                 args.warmup)}
        ok = report["latency_capture_to_output_ms"]["all"] is not None
    else:
        report = run_live(args)
        ok = report["reason"] == "finished"
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
