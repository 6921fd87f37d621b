"""run-engine: separate the instruments of a video file, a pipe or a live camera + microphone.

    run_engine.py --demo                              # a generated ensemble clip, end to end
    run_engine.py --input clip.mkv --out sep/         # sep/violin#1.wav ... + sep/summary.json
    cat clip.mkv | run_engine.py --input - --out sep/
    run_engine.py --input mic --video camera --monitor violin
    run_engine.py --input mic --video tcp://127.0.0.1:5000 --duration 60 --out sep/
    run_engine.py --graph my.toml                     # any graph (nodes on other hosts, CURVE)

The command builds a graph of nodes (sources -> stft -> separator -> overlap_add -> sinks, with
camera -> detector -> motion feeding the separator's query cache) as TOML text and runs it with
engine.launcher: one process per node. See docs/RUN_ENGINE.md.

Exit codes: 0 done; 1 the engine failed while running (a node crashed, --timeout); 2 bad
arguments or an input/bundle that cannot be used (nothing was run); 3 ran, but no instrument
was found, so nothing was separated (try --fallback-queries); 130 interrupted (files only: a
live run ends with Ctrl-C normally and exits 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from engine.graph import GraphError, load_graph, parse_graph
from engine.launcher import Launcher
from engine.profiler import format_summary

ROOT = Path(__file__).resolve().parent
DEFAULT_BUNDLE = ROOT / "models" / "checkpoints" / "cpu"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iquery-live"
SAMPLE_RATE = 11025  # the engine's audio rate (models.spectral.SAMPLE_RATE)
HOP, N_FFT = 256, 1022
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_INSTRUMENT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Written into the run dir by the audio source and the WAV sink (nodes.sources, nodes.sinks).
CAPTURE_LOG, WRITE_LOG = "audio.capture.json", "wav.writes.json"
# Streaming settings of live inputs (mic, camera/stream video, --realtime), chosen by
# measurement (docs/RUN_ENGINE.md, "Live defaults"): capture-to-output p95 <= 250 ms on a shared
# 2-core CPU. Files keep the bundle's (higher-quality, more lookahead) settings.
LIVE_STREAM = {"block": 2, "lookahead": 4, "source_block": HOP}


class UsageError(Exception):
    """Arguments or inputs that cannot be used: printed as one line, exit 2."""


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` explains every option)."""
    ap = argparse.ArgumentParser(
        prog="run-engine",
        description="Live audio-visual instrument separation (iQuery): one output per "
                    "instrument seen by the camera.",
        epilog="Exit codes: 0 done, 1 engine failure, 2 unusable arguments/input, 3 no "
               "instrument found, 130 interrupted. See docs/RUN_ENGINE.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_argument_group("what to run")
    what.add_argument("--demo", action="store_true",
                      help="generate (once, cached) a small SynthMUSIC ensemble clip, separate it, "
                           "print a summary table and the SDR against its ground-truth stems")
    what.add_argument("--input", "-i", metavar="SRC",
                      help="audio (and video) source: a media file, '-' for stdin (a pipe), or "
                           "'mic' / 'mic:DEVICE' for a sound card")
    what.add_argument("--video", metavar="SRC",
                      help="video source when it is not --input: 'camera' (/dev/video0), "
                           "/dev/videoN, tcp:// udp:// rtsp:// URL or a file; 'none' for no video")
    what.add_argument("--graph", metavar="TOML", help="run this graph file instead (every other "
                      "option but --run-dir/--timeout/--host is ignored)")
    what.add_argument("--host", metavar="ADDR",
                      help="with --graph: run only the nodes whose host is ADDR, this machine's "
                           "part of a graph split over machines (run one per machine; needs "
                           "[graph] base_port; see docs/ENGINE.md)")
    what.add_argument("--list-devices", action="store_true",
                      help="list sound cards and cameras, then exit")
    out = ap.add_argument_group("outputs")
    out.add_argument("--out", "-o", metavar="DIR", default=None,
                     help="write DIR/<label>.wav per instrument and DIR/summary.json "
                          "(default: sep/ for files and --demo, none for live input)")
    out.add_argument("--monitor", metavar="LABEL",
                     help="play one instrument on the default sound card ('violin' means "
                          "violin#1; give 'violin#2' for another)")
    out.add_argument("--tap", metavar="ENDPOINT",
                     help="also publish every output on this ZeroMQ endpoint (e.g. "
                          "tcp://127.0.0.1:5599)")
    model = ap.add_argument_group("model and streaming")
    model.add_argument("--bundle", default=str(DEFAULT_BUNDLE),
                       help="model bundle directory (default models/checkpoints/cpu; a random "
                            "bundle is used, with a warning, when it is missing)")
    model.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    model.add_argument("--block", type=int, default=None,
                       help="STFT frames emitted per separator step (default: the bundle's for "
                            f"files, {LIVE_STREAM['block']} for live input: mic, camera, "
                            "--realtime)")
    model.add_argument("--lookahead", type=int, default=None,
                       help="frames of right context (default: the bundle's for files, "
                            f"{LIVE_STREAM['lookahead']} for live input)")
    model.add_argument("--source-block", type=int, default=None, metavar="N",
                       help="audio samples per source chunk (default: block * 256 for files, "
                            f"{LIVE_STREAM['source_block']} for live input)")
    model.add_argument("--fallback-queries", nargs="?", const="all", default=None,
                       metavar="CLASSES",
                       help="when no instrument is detected, separate with the learned queries "
                            "of all classes (no value) or of a comma-separated list")
    model.add_argument("--detect-every", type=float, default=0.25, metavar="S",
                       help="seconds of video between detector runs (default 0.25; a new "
                            "track needs 2 detections in a row)")
    model.add_argument("--update-every", type=float, default=1.0, metavar="S",
                       help="seconds of video between track updates, i.e. new object and "
                            "motion features for the separator (default 1); a newly "
                            "confirmed track goes out at once")
    model.add_argument("--score-threshold", type=float, default=None,
                       help="detector score a track needs (default: the bundle's)")
    run = ap.add_argument_group("running")
    run.add_argument("--realtime", action="store_true",
                     help="pace a file at its media rate (as a live source would arrive)")
    run.add_argument("--duration", type=float, default=None, metavar="S",
                     help="stop a live run after S seconds (outputs stay valid)")
    run.add_argument("--timeout", type=float, default=None, metavar="S",
                     help="give up after S seconds (exit 1)")
    run.add_argument("--run-dir", default=None,
                     help="where node logs, specs and stats go (default: a temp dir)")
    run.add_argument("--format", default=None,
                     help="force the FFmpeg container format of --input (e.g. mpegts)")
    run.add_argument("--demo-dir", default=str(CACHE / "demo"),
                     help="where --demo keeps its generated clip")
    return ap


# ---------------------------------------------------------------------------- helpers
def log(line: str) -> None:
    """Progress and warnings go to stderr; the summary table goes to stdout."""
    print(f"run-engine: {line}", file=sys.stderr, flush=True)


def probe(path: str, fmt: str | None = None) -> dict[str, Any]:
    """Streams and duration of a media file: {"audio": bool, "video": bool, "duration_s"}."""
    import av

    try:
        with av.open(path, format=fmt) as c:
            dur = c.duration / 1e6 if c.duration else None
            return {"audio": bool(c.streams.audio), "video": bool(c.streams.video),
                    "duration_s": dur}
    except (av.error.FFmpegError, OSError) as exc:
        raise UsageError(f"cannot open input {path!r}: {exc}") from None


def bundle_info(path: str) -> tuple[Path, dict[str, Any], bool]:
    """(bundle dir, bundle.json, is_random); writes a random bundle when the default is absent."""
    p = Path(path)
    random_bundle = False
    if not (p / "bundle.json").is_file():
        if Path(path).resolve() != DEFAULT_BUNDLE.resolve():
            raise UsageError(f"bundle {path!r} has no bundle.json (see docs/BUNDLE.md)")
        p = CACHE / "random-bundle"
        log(f"no trained bundle at {path}: using a RANDOMLY INITIALISED bundle in {p} (outputs "
            "are not real separations; train one with the training/ tools)")
        if not (p / "bundle.json").is_file():
            subprocess.run([sys.executable, "-m", "nodes.bundle", "--random", str(p)],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        random_bundle = True
    info = json.loads((p / "bundle.json").read_text())
    random_bundle = random_bundle or bool(info.get("training", {}).get("random"))
    return p, info, random_bundle


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def graph_toml(nodes: dict[str, tuple[str, dict[str, Any], int | None]],
               edges: list[tuple[str, str]], name: str = "run-engine") -> str:
    """TOML text of a graph: nodes {name: (class, params, max_restarts)} and edges."""
    lines = [f"[graph]\nname = {_toml_value(name)}\n"]
    for n, (cls, params, restarts) in nodes.items():
        lines.append(f"[nodes.{n}]\nclass = {_toml_value(cls)}")
        if restarts is not None:
            lines.append(f"max_restarts = {restarts}")
        clean = {k: v for k, v in params.items() if v is not None}
        lines.append(f"params = {_toml_value(clean)}\n")
    for a, b in edges:
        lines.append(f"[[edges]]\nfrom = {_toml_value(a)}\nto = {_toml_value(b)}\n")
    return "\n".join(lines)


def _tee_stdin(fifos: list[str]) -> threading.Thread:
    """Copy stdin into every FIFO (the audio and the video node each read one): a pipe is read
    once, as it arrives, and both paths stream. Each FIFO has its own writer thread and queue,
    so a reader that is slow to open (or never does) cannot stall the other."""
    import queue

    queues: list[queue.Queue] = [queue.Queue(maxsize=256) for _ in fifos]  # 16 MB each

    def discard(q: queue.Queue) -> None:
        try:
            queues.remove(q)
        except ValueError:  # the other thread was first
            pass

    def write(path: str, q: queue.Queue) -> None:
        try:
            with open(path, "wb", buffering=0) as f:  # blocks until the node opens it
                while (data := q.get()) is not None:
                    f.write(data)
        except OSError:  # that reader ended (e.g. an input without video)
            pass
        finally:
            while True:  # let the reader of stdin go on
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            discard(q)

    def read() -> None:
        src = sys.stdin.buffer
        while queues:
            data = src.read1(1 << 16) if hasattr(src, "read1") else src.read(1 << 16)
            for q in list(queues):
                try:
                    q.put(data or None, timeout=60)
                except queue.Full:  # a reader that stopped reading for a minute
                    discard(q)
            if not data:
                break

    for path, q in zip(fifos, queues, strict=True):
        threading.Thread(target=write, args=(path, q), name="fifo-writer", daemon=True).start()
    t = threading.Thread(target=read, name="stdin-tee", daemon=True)
    t.start()
    return t


# ----------------------------------------------------------------------------- the graph
def is_live_input(args: argparse.Namespace) -> bool:
    """Audio or video that arrives in real time: a microphone, a camera or network stream, or a
    file paced with --realtime."""
    video = args.video or ""
    return bool((args.input or "").startswith("mic") or args.realtime or video == "camera"
                or video.startswith("/dev/") or "://" in video)


def apply_stream_defaults(args: argparse.Namespace, info: dict[str, Any], live: bool) -> None:
    """Fill --block, --lookahead and --source-block that were not given: LIVE_STREAM for live
    input, the bundle's ``stream`` (and one source chunk per block) for files."""
    base = LIVE_STREAM if live else {**info["stream"], "source_block": None}
    if args.block is None:
        args.block = base["block"]
    if args.lookahead is None:
        args.lookahead = base["lookahead"]
    if args.source_block is None:
        args.source_block = base["source_block"] or args.block * HOP


def default_graph(args: argparse.Namespace, bundle: Path, info: dict[str, Any],
                  run_dir: Path, audio_src: dict[str, Any], video_url: str | None,
                  live: bool) -> str:
    """The default graph of the options, as TOML text."""
    block = args.block or info["stream"]["block"]
    source_block = getattr(args, "source_block", None) or block * HOP
    fps = info["visual"]["fps"]
    fallback = None
    if args.fallback_queries:
        fallback = ["all"] if args.fallback_queries == "all" else \
            [c.strip() for c in args.fallback_queries.split(",") if c.strip()]
    nodes: dict[str, tuple[str, dict[str, Any], int | None]] = {}
    edges: list[tuple[str, str]] = []
    # A source that crashed cannot resume where it was (a pipe, a file re-read from the start
    # would repeat audio): no restarts, the run ends with the error.
    capture_log = str(run_dir / CAPTURE_LOG)
    if audio_src["kind"] == "mic":
        nodes["audio"] = ("nodes.sources:MicSource",
                          {"device": audio_src.get("device"), "block": source_block,
                           "capture_log": capture_log}, 0)
    else:
        nodes["audio"] = ("nodes.sources:FileSource",
                          {"path": audio_src["path"], "block": source_block,
                           "realtime": args.realtime, "format": audio_src.get("format"),
                           "capture_log": capture_log}, 0)
    nodes["stft"] = ("nodes.stft:STFT", {"block": block}, None)
    nodes["separator"] = ("nodes.separator:Separator", {
        "bundle": str(bundle), "backend": args.backend, "device": args.device,
        "block": block, "lookahead": args.lookahead,
        # Blending each frame's estimates helps the files' centred block, not the live
        # schedule's block at the window's edge (models.streaming).
        "blend": not live,
        "sync_vision": bool(video_url) and not live and not args.realtime,
        "fallback": fallback, "report_path": str(run_dir / "separator.report.json")}, None)
    nodes["overlap_add"] = ("nodes.overlap_add:OverlapAdd", {}, None)
    edges += [("audio.audio", "stft.audio"), ("stft.spec", "separator.spec"),
              ("separator.masks", "overlap_add.masks")]
    if video_url:
        nodes["camera"] = ("nodes.video:CameraSource", {
            "url": video_url, "fps": fps, "realtime": args.realtime and not live,
            # A file or FIFO may wait on the audio path (a pipe is shared): no early give-up.
            "open_timeout_s": 10.0 if live else 120.0, "read_timeout_s": 5.0 if live else 120.0,
            "format": audio_src.get("format") if video_url == audio_src.get("path") else None},
            0)
        nodes["detector"] = ("nodes.detector:Detector", {
            "bundle": str(bundle), "interval_s": args.update_every,
            "detect_every_s": args.detect_every,
            "score_threshold": args.score_threshold, "device": detector_device(args.device),
            "report_path": str(run_dir / "detector.report.json")}, None)
        nodes["motion"] = ("nodes.motion:Motion", {"bundle": str(bundle), "device": args.device},
                           None)
        edges += [("camera.video", "detector.video"), ("camera.video", "motion.video"),
                  ("detector.tracks", "motion.tracks"), ("motion.vision", "separator.vision")]
    sinks = []
    if args.out:
        nodes["wav"] = ("nodes.sinks:WavSink", {"out_dir": str(Path(args.out).resolve()),
                                                "latency_log": str(run_dir / WRITE_LOG)}, None)
        sinks.append("wav")
    if args.monitor:
        label = args.monitor if ("#" in args.monitor or fallback) else f"{args.monitor}#1"
        nodes["monitor"] = ("nodes.sinks:MonitorSink", {"labels": [label]}, None)
        sinks.append("monitor")
    if args.tap:
        nodes["tap"] = ("nodes.sinks:TapSink", {"endpoint": args.tap}, None)
        sinks.append("tap")
    if not sinks:
        raise UsageError("nothing to output: give --out DIR, --monitor LABEL or --tap ENDPOINT")
    edges += [("overlap_add.audio", f"{s}.audio") for s in sinks]
    return graph_toml(nodes, edges)


# ----------------------------------------------------------------------------- results
def read_wav(path: Path) -> np.ndarray:
    """Mono float samples of a WAV file (int16 scaled to [-1, 1])."""
    from scipy.io import wavfile

    _, x = wavfile.read(path)
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
    return x if x.ndim == 1 else x.mean(axis=1)


def pad_outputs(out_dir: Path, n_samples: int) -> dict[str, Path]:
    """Every output WAV zero-padded to the input's length (a track that left early ends in
    silence); returns label -> path."""
    from scipy.io import wavfile

    files = {}
    for f in sorted(out_dir.glob("*.wav")):
        x = read_wav(f)
        if len(x) < n_samples:
            wavfile.write(f, SAMPLE_RATE, np.concatenate([x, np.zeros(n_samples - len(x),
                                                                      np.float32)]))
        files[f.stem] = f
    return files


def sdr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Plain signal-to-distortion ratio (dB): 10 log10 |s|^2 / |s - s_hat|^2."""
    n = min(len(reference), len(estimate))
    s, e = reference[:n].astype(np.float64), estimate[:n].astype(np.float64)
    return float(10 * np.log10((np.sum(s ** 2) + 1e-12) / (np.sum((s - e) ** 2) + 1e-12)))


def algorithmic_latency_ms(source_block: int, block: int, lookahead: int,
                           stft_block: int | None = None) -> dict[str, Any]:
    """The algorithmic (zero-compute) capture-to-output latency of each sample, in ms.

    Follows the chain exactly: the source sends ``source_block`` samples once the last of
    them is captured; the STFT (centred frames of N_FFT, hop HOP) completes frame f with input
    sample f * HOP + N_FFT // 2 - 1 and sends ``stft_block`` (default ``block``) frames per
    message; the separator emits frames [e, e + block) once frame e + block + lookahead - 1 has
    arrived; overlap-add makes sample i final once every frame touching it is in. The parts
    overlap (a source block fills while the separator's block does), so no sum of them is the
    latency: this is computed per sample over one period of the schedule. ``total`` is the
    worst sample's, the bound that a p95/p99 of the measured latency compares with.
    """
    import math

    stft_block = stft_block or block
    pad = N_FFT // 2  # models.spectral.PAD: frame f is centred on sample f * HOP
    period = math.lcm(source_block, block * HOP, stft_block * HOP)
    i = np.arange(2 * period, 4 * period, dtype=np.int64)  # away from the stream's start
    last_frame = (i + pad) // HOP  # the last frame that touches sample i
    emitted = block * -(-(last_frame + 1) // block)  # frames out when it is final
    need = stft_block * -(-(emitted + lookahead) // stft_block)  # frames the STFT must send
    need_samples = (need - 1) * HOP + pad  # input samples that complete frame need - 1
    sent = source_block * -(-need_samples // source_block)  # ... as whole source blocks
    ms = (sent - i) * 1000.0 / SAMPLE_RATE
    return {"min": float(ms.min()), "p50": float(np.percentile(ms, 50)),
            "mean": float(ms.mean()), "total": float(ms.max()),
            "settings": {"source_block": source_block, "block": block, "lookahead": lookahead,
                         "stft_block": stft_block},
            "lookahead_part": lookahead * HOP * 1000.0 / SAMPLE_RATE}


def capture_latency_ms(run_dir: Path, skip_s: float = 0.0, stride: int = 8,
                       by_s: float | None = None) -> dict[str, Any] | None:
    """Capture-to-output latency of the separated samples (ms), from the source's capture log
    and the WAV sink's write log: per output sample i, (when the sink wrote it) - (when input
    sample i was captured). Every ``stride``-th sample of the streams counts; samples of the
    first ``skip_s`` seconds are left out; ``by_s`` adds ``p95_by_window``, the p95 of each
    ``by_s`` seconds of media time (how a start-up backlog drains). None when a log is missing
    or the source had no capture clock (a file read as fast as possible)."""
    try:
        cap = json.loads((run_dir / CAPTURE_LOG).read_text())
        writes = json.loads((run_dir / WRITE_LOG).read_text())["writes"]
    except (OSError, ValueError, KeyError):
        return None
    if cap.get("method") == "emit time" or not cap.get("anchors") or not writes:
        return None
    anchors = np.asarray(cap["anchors"], np.float64)  # (M, 2): sample index, capture time
    anchors = anchors[np.argsort(anchors[:, 0], kind="stable")]
    lat, where = [], []
    for rows in writes.values():
        for first, n, t_written in rows:
            idx = np.arange(first, first + n, stride, dtype=np.float64)
            idx = idx[idx >= skip_s * SAMPLE_RATE]
            if not idx.size:
                continue
            # The newest anchor at or before each sample: a sound card's clock drifts against
            # the monotonic clock, so never extrapolate across a whole run.
            a = np.clip(np.searchsorted(anchors[:, 0], idx, side="right") - 1, 0, None)
            captured = anchors[a, 1] + (idx - anchors[a, 0]) / SAMPLE_RATE
            lat.append(t_written - captured)
            where.append(idx)
    if not lat:
        return None
    ms = np.concatenate(lat) * 1000.0
    out = {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
           "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
           "n": int(ms.size), "stride": stride, "skip_s": skip_s, "clock": cap.get("method")}
    if by_s:
        win = (np.concatenate(where) // (by_s * SAMPLE_RATE)).astype(np.int64)
        out["p95_by_window"] = [round(float(np.percentile(ms[win == w], 95)), 1)
                                for w in range(int(win.max()) + 1) if np.any(win == w)]
        out["window_s"] = by_s
    return out


def make_summary(result: dict[str, Any], run_dir: Path, out_dir: Path | None,
                 duration_s: float | None, block: int, lookahead: int,
                 extra: dict[str, Any], source_block: int | None = None) -> dict[str, Any]:
    """summary.json: instruments (files, seen/separated spans), timings, counters."""
    def report(name: str) -> dict[str, Any]:
        p = run_dir / f"{name}.report.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    det, sep = report("detector"), report("separator")
    nodes = result["nodes"]
    files: dict[str, Path] = {}
    if out_dir is not None and out_dir.is_dir():
        lengths = [len(read_wav(f)) for f in out_dir.glob("*.wav")]
        if duration_s is None and lengths:
            duration_s = max(lengths) / SAMPLE_RATE
        if duration_s is not None:
            files = pad_outputs(out_dir, int(round(duration_s * SAMPLE_RATE)))
    labels = sorted(set(files) | set(sep.get("spans", {})))
    instruments = [{"label": lb, "class": lb.split("#")[0],
                    "file": str(files[lb]) if lb in files else None,
                    "seen_s": det.get(lb, {}).get("spans", []),
                    "separated_s": [[a, min(b, duration_s or b)] for a, b in
                                    sep.get("spans", {}).get(lb, [])]} for lb in labels]
    counters = {n: v.get("counters", {}) for n, v in nodes.items()}
    sep_compute = counters.get("separator", {}).get("compute_us", 0) / 1e6
    lat = result.get("latency", {})
    e2e = lat.get("end_to_end", {})
    algo_ms = algorithmic_latency_ms(source_block or block * HOP, block, lookahead)
    return {
        **extra,
        "reason": result["reason"], "error": result["error"],
        "duration_s": duration_s,
        "instruments": instruments,
        "timings": {
            "wall_s": result["wall_s"],
            "separator_compute_s": sep_compute,
            "rtf": sep_compute / duration_s if duration_s else None,
            "rtf_wall": result["wall_s"] / duration_s if duration_s else None,
            "compute_ms": {n: {k: s.get(k) for k in ("p50", "p95", "n")}
                           for n, s in lat.get("compute", {}).items()},
            "end_to_end_ms": {k: e2e.get(k) for k in ("p50", "p95", "p99", "n")},
            "end_to_end_note": "compute + queueing from the source's emit to the sink; "
                               "algorithmic latency not included (see algorithmic_ms)",
            "capture_to_output_ms": capture_latency_ms(run_dir),
            "capture_to_output_note": "per output sample: WAV write time - capture time of "
                                      "the same input sample (everything: algorithmic, "
                                      "compute, queueing; real-time inputs only)",
            "algorithmic_ms": algo_ms,
        },
        "separator": {k: sep.get(k) for k in ("window", "block", "lookahead", "backend",
                                              "device", "fallback")},
        "counters": counters,
        "run_dir": str(run_dir),
    }


def print_table(summary: dict[str, Any], sdr: dict[str, float] | None = None) -> None:
    """The human summary on stdout."""
    t = summary["timings"]
    print(f"{'instrument':<22} {'output file':<44} {'SDR dB':>7}")
    for inst in summary["instruments"]:
        s = f"{sdr[inst['label']]:7.2f}" if sdr and inst["label"] in sdr else f"{'-':>7}"
        print(f"{inst['label']:<22} {inst['file'] or '-'!s:<44} {s}")
    if not summary["instruments"]:
        print("(no instrument found)")
    rtf = f"{t['rtf']:.3f}" if t["rtf"] is not None else "-"
    e2e = t["end_to_end_ms"]
    lat = (f"p50 {e2e['p50']:.1f} ms, p95 {e2e['p95']:.1f} ms" if e2e.get("p50") is not None
           else "-")
    print(f"RTF (separator compute / audio) {rtf}; wall {t['wall_s']:.1f} s for "
          f"{summary['duration_s'] or 0:.2f} s of audio")
    a = t["algorithmic_ms"]
    c2o = t.get("capture_to_output_ms")
    algo = (f"algorithmic p50 {a['p50']:.0f} ms, worst {a['total']:.0f} ms (source block, "
            f"frame, block, lookahead; zero compute)")
    if not c2o:
        # As fast as possible, the source emits the whole file at once: emit-to-output times
        # measure that backlog, not a live latency.
        print(f"latency: not measured (file read as fast as possible; use --realtime or a live "
              f"input); {algo}")
    else:
        print(f"end-to-end latency (compute + queueing) {lat}; {algo}")
        print(f"capture-to-output latency p50 {c2o['p50']:.1f} ms, p95 {c2o['p95']:.1f} ms, "
              f"p99 {c2o['p99']:.1f} ms (input captured -> WAV written, all parts)")


def list_devices() -> int:
    """Sound cards (sounddevice) and cameras (/dev/video*)."""
    try:
        import sounddevice as sd

        print("Sound devices (use --input mic:INDEX or mic:NAME):")
        print(sd.query_devices())
    except Exception as exc:  # PortAudio missing or no server: still list cameras
        print(f"Sound devices: unavailable ({exc})")
    cams = sorted(str(p) for p in Path("/dev").glob("video*"))
    print("Cameras (use --video /dev/videoN):", ", ".join(cams) if cams else "none found")
    return EXIT_OK


def check_device(device: str) -> None:
    """--device cuda on a machine where torch sees no GPU: one line now, not three crashed
    nodes later."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device (use --device auto or cpu)")


def detector_device(device: str) -> str:
    """The detector's device for --device: it runs on onnxruntime, whose build may lack the
    CUDA provider that torch's has; then it runs on the CPU (said once) while the torch nodes
    use the GPU."""
    if device != "cuda":
        return device
    from nodes.detector import onnx_providers

    try:
        onnx_providers(device)  # the nodes' one rule for onnxruntime's providers
        return device
    except ValueError:
        log("--device cuda: onnxruntime has no CUDA provider; the detector runs on the CPU")
        return "cpu"


def demo_clip(demo_dir: Path) -> Path:
    """A small SynthMUSIC ensemble clip, generated once by training.synth (subprocess)."""
    ens = demo_dir / "ensembles"
    clips = sorted(ens.glob("*/video.mkv")) if ens.is_dir() else []
    if not clips:
        log(f"generating a demo clip in {demo_dir} (python -m training.synth --size tiny)")
        proc = subprocess.run([sys.executable, "-m", "training.synth", "--out", str(demo_dir),
                               "--size", "tiny", "--seed", "0", "--quiet"], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            raise UsageError(f"could not generate the demo clip: {' '.join(tail)}")
        clips = sorted(ens.glob("*/video.mkv"))
        if not clips:
            raise UsageError(f"training.synth wrote no ensemble clip under {ens}")
    return clips[0]


# ------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    """Everything after argument parsing; raises UsageError for unusable inputs."""
    if args.list_devices:
        return list_devices()
    if args.graph:
        try:
            graph = load_graph(args.graph)
            launcher = Launcher(graph, args.run_dir, host=args.host)
        except (GraphError, OSError) as exc:
            raise UsageError(str(exc)) from None
        log(f"running {args.graph}; logs in {launcher.run_dir}")
        result = launcher.run(args.timeout)
        print(format_summary(result["latency"]))
        return EXIT_OK if result["reason"] in ("finished", "signal") else EXIT_FAILED
    if args.host:
        raise UsageError("--host ADDR runs part of a graph: it needs --graph")
    demo_stems: Path | None = None
    if args.demo:
        clip = demo_clip(Path(args.demo_dir))
        args.input = str(clip)
        demo_stems = clip.parent / "stems"
        args.out = args.out or "sep"
    if not args.input:
        raise UsageError("give --input FILE|-|mic, --demo, --graph or --list-devices "
                         "(see --help)")
    for name in ("block", "lookahead", "source_block"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "lookahead" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {v} is out of range")
    check_device(args.device)
    live = args.input.startswith("mic")
    fifo_dir = None
    duration_s = None
    video_url: str | None = None
    if live:
        dev = args.input.partition(":")[2] or None
        audio_src: dict[str, Any] = {"kind": "mic",
                                     "device": int(dev) if dev and dev.isdigit() else dev}
        video_url = args.video if args.video not in (None, "none") else None
    elif args.input == "-":
        fifo_dir = Path(tempfile.mkdtemp(prefix="iq-stdin-"))
        audio_fifo = fifo_dir / "audio"
        os.mkfifo(audio_fifo)
        audio_src = {"kind": "file", "path": str(audio_fifo), "format": args.format}
        if args.video is None:
            video_fifo = fifo_dir / "video"
            os.mkfifo(video_fifo)
            video_url = str(video_fifo)
        elif args.video != "none":
            video_url = args.video
    else:
        if not Path(args.input).exists() and "://" not in args.input:
            raise UsageError(f"input {args.input!r} does not exist")
        p = probe(args.input, args.format)
        if not p["audio"]:
            raise UsageError(f"input {args.input!r} has no audio stream: nothing to separate")
        duration_s = p["duration_s"]
        audio_src = {"kind": "file", "path": args.input, "format": args.format}
        if args.video is None:
            video_url = args.input if p["video"] else None
            if not p["video"] and not args.fallback_queries:
                raise UsageError(f"input {args.input!r} has no video stream, so no instrument "
                                 "can be seen: give --video SRC, or --fallback-queries "
                                 "[CLASSES] to separate with class queries")
            if not p["video"]:
                log("no video stream: separating with the fallback class queries")
        elif args.video != "none":
            video_url = args.video
    bundle, info, random_bundle = bundle_info(args.bundle)
    apply_stream_defaults(args, info, is_live_input(args))
    if args.out is None and not live and not args.monitor and not args.tap:
        args.out = "sep"
    out_dir = Path(args.out).resolve() if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*.wav"):  # outputs of an earlier run would mix with these
            old.unlink()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="iq-run-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    toml = default_graph(args, bundle, info, run_dir, audio_src, video_url, live)
    (run_dir / "graph.toml").write_text(toml)
    import tomllib

    graph = parse_graph(tomllib.loads(toml), str(run_dir))
    launcher = Launcher(graph, run_dir, log=lambda line: log(f"[launcher] {line}"))
    log(f"{'live' if live else 'file'} run: input {args.input}, video {video_url or 'none'}, "
        f"bundle {bundle}; block {args.block}, lookahead {args.lookahead}, source block "
        f"{args.source_block}; logs in {run_dir}")
    try:
        if fifo_dir is not None:
            launcher.start()
            _tee_stdin([str(audio_fifo)] + ([video_url] if video_url and
                                              video_url.startswith(str(fifo_dir)) else []))
        limit = args.duration if args.duration is not None else args.timeout
        result = launcher.run(limit)
    finally:
        if fifo_dir is not None:
            shutil.rmtree(fifo_dir, ignore_errors=True)
    block = args.block or info["stream"]["block"]
    lookahead = info["stream"]["lookahead"] if args.lookahead is None else args.lookahead
    summary = make_summary(result, run_dir, out_dir, duration_s, block, lookahead, {
        "input": args.input, "video": video_url, "bundle": str(bundle),
        "random_bundle": random_bundle, "live": live}, source_block=args.source_block)
    counters = summary["counters"]
    nonfinite = counters.get("audio", {}).get("nonfinite_samples", 0)
    if nonfinite:
        log(f"warning: {nonfinite} non-finite (NaN/inf) input samples were replaced by 0")
    lost = counters.get("camera", {}).get("input_lost", 0)
    if lost:
        log("warning: the video input ended early or could not be read (see camera.log)")
    sdr = None
    if demo_stems is not None and demo_stems.is_dir():
        sdr = {}
        for inst in summary["instruments"]:
            stem = demo_stems / f"{inst['class']}.wav"
            if inst["file"] and stem.is_file():
                sdr[inst["label"]] = sdr_db(read_wav(stem), read_wav(Path(inst["file"])))
        summary["sdr_db"] = sdr
    if out_dir is not None:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary, sdr)
    peaks = [float(np.abs(read_wav(Path(i["file"]))).max(initial=0.0))
             for i in summary["instruments"] if i["file"]]
    if peaks and max(peaks) == 0.0:
        log("warning: every output is silent: the input audio is silent")
    if result["reason"] == "failed":
        log(f"error: {result['error']}")
        log_tail(run_dir, result)
        return EXIT_FAILED
    if result["reason"] == "timeout" and args.duration is None:
        log(f"error: stopped by --timeout {args.timeout} s before the input ended")
        return EXIT_FAILED
    if result["reason"] == "signal":
        return EXIT_OK if live else EXIT_INTERRUPTED
    if not summary["instruments"]:
        log("no instrument was found, nothing was separated (try --fallback-queries)")
        return EXIT_NO_INSTRUMENT
    return EXIT_OK


def log_tail(run_dir: Path, result: dict[str, Any]) -> None:
    """The last lines of the log of each node that exited with an error."""
    for name, n in result["nodes"].items():
        if any(c not in (0, None) for c in n.get("exit_codes", [])):
            lines = (run_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
            for line in lines[-3:]:
                log(f"  {name}: {line}")


def main(argv: list[str] | None = None) -> int:
    """Console entry (``run-engine``): parse, run, turn any error into one line + exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"run-engine: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (GraphError, ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"run-engine: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
