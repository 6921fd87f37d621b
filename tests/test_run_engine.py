"""run_engine end to end with the random bundle: a file, a pipe, bad inputs, a live run.

Each run starts one process per node; the clips are short so that the whole module stays well
under two minutes on two cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.io import wavfile

import run_engine
from nodes.bundle import make_random_bundle

ROOT = Path(__file__).resolve().parents[1]
SR = 11025


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.getbasetemp() / "random_bundle"
    if not (path / "bundle.json").is_file():
        make_random_bundle(path)
    return str(path)


def write_clip(path: Path, seconds: float = 2.0, *, rate: int = SR, channels: int = 1,
               video: bool = True, audio: bool = True, nan: bool = False,
               silent: bool = False, fps: int = 8) -> Path:
    """A short mkv: two tones (float32 PCM) and a moving picture at ``fps``."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.2 * np.sin(2 * np.pi * 880 * t)
    x = np.zeros_like(x) if silent else x
    pcm = np.repeat(x[None], channels, 0).astype(np.float32)
    if nan:
        pcm[:, n // 3:n // 3 + 50] = np.nan
    with av.open(str(path), "w", format="matroska") as c:
        a = v = None
        if audio:
            a = c.add_stream("pcm_f32le", rate=rate, layout="mono" if channels == 1 else "stereo")
        if video:
            v = c.add_stream("mpeg4", rate=fps)
            v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
            for i in range(int(seconds * fps)):
                img = np.full((64, 96, 3), 40, np.uint8)
                img[:, (i * 4) % 96:(i * 4) % 96 + 8] = 220
                for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in v.encode(None):
                c.mux(p)
        if a is not None:
            for s in range(0, n, 1024):  # planar float: (channels, samples)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s:s + 1024]),
                                                   format="fltp", layout=a.layout.name)
                frame.sample_rate, frame.pts = rate, s
                for p in a.encode(frame):
                    c.mux(p)
            for p in a.encode(None):
                c.mux(p)
    return path


def engine(*args: str, stdin: Path | None = None, env: dict | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
        return subprocess.run([sys.executable, str(ROOT / "run_engine.py"), *args], cwd=ROOT,
                              stdin=f, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})


def outputs(out: Path) -> dict[str, np.ndarray]:
    files = {}
    for f in sorted(out.glob("*.wav")):
        rate, x = wavfile.read(f)
        assert rate == SR
        files[f.stem] = x
    return files


def check_summary(out: Path, labels: set[str]) -> dict:
    s = json.loads((out / "summary.json").read_text())
    assert {i["label"] for i in s["instruments"]} == labels
    for inst in s["instruments"]:
        assert Path(inst["file"]).is_file()
    t = s["timings"]
    assert t["rtf"] is not None and t["rtf"] > 0
    assert t["end_to_end_ms"]["p50"] > 0 and t["end_to_end_ms"]["p95"] >= t["end_to_end_ms"]["p50"]
    assert "separator" in t["compute_ms"] and t["algorithmic_ms"]["total"] > 0
    return s


def test_help_explains_and_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        run_engine.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--demo", "--input", "--video", "--fallback-queries", "--monitor", "--realtime",
                "--backend", "--lookahead", "--block", "--graph", "--list-devices", "Exit codes"):
        assert opt in text
    assert run_engine.main(["--input", "/nonexistent/clip.mkv"]) == run_engine.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert run_engine.main([]) == run_engine.EXIT_USAGE


def test_device_cuda_without_a_gpu_is_one_line_and_detector_falls_back(
        monkeypatch, capsys, bundle: str, tmp_path: Path) -> None:
    import onnxruntime
    import torch

    clip = write_clip(tmp_path / "clip.mkv", 1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_engine.main(["--input", str(clip), "--device", "cuda", "--out",
                            str(tmp_path / "sep"), "--bundle", bundle]) == run_engine.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch sees no CUDA device" in err[0]
    # A GPU for torch but an onnxruntime without CUDA: the detector alone runs on the CPU.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert run_engine.detector_device("cuda") == "cpu"
    assert run_engine.detector_device("auto") == "auto"


def test_file_gives_one_wav_per_track_at_input_duration(bundle: str, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mkv", 2.0)
    out = tmp_path / "sep"
    r = engine("--input", str(clip), "--out", str(out), "--bundle", bundle)
    assert r.returncode == 0, r.stderr
    files = outputs(out)
    assert set(files) == {"accordion#1", "acoustic_guitar#1"}  # the random detector's tracks
    for x in files.values():
        assert len(x) == 2 * SR and np.isfinite(x).all() and np.abs(x).max() > 0
    s = check_summary(out, set(files))
    assert s["duration_s"] == pytest.approx(2.0)
    assert s["instruments"][0]["seen_s"][0][0] == 0.0
    assert "accordion#1" in r.stdout and "RTF" in r.stdout


def test_pipe_of_44k_stereo_with_nan_samples(bundle: str, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mkv", 2.0, rate=44100, channels=2, nan=True)
    out = tmp_path / "sep"
    r = engine("--input", "-", "--out", str(out), "--bundle", bundle, stdin=clip)
    assert r.returncode == 0, r.stderr
    files = outputs(out)
    assert set(files) == {"accordion#1", "acoustic_guitar#1"}
    for x in files.values():  # resampled to 11025 Hz, downmixed, NaN replaced
        assert len(x) == 2 * SR and np.isfinite(x).all()
    assert "non-finite" in r.stderr
    check_summary(out, set(files))


def test_inputs_without_audio_or_video(bundle: str, tmp_path: Path) -> None:
    no_audio = write_clip(tmp_path / "na.mkv", 1.0, audio=False)
    r = engine("--input", str(no_audio), "--out", str(tmp_path / "o1"), "--bundle", bundle)
    assert r.returncode == run_engine.EXIT_USAGE and "no audio stream" in r.stderr
    no_video = write_clip(tmp_path / "nv.mkv", 1.0, video=False, silent=True)
    r = engine("--input", str(no_video), "--out", str(tmp_path / "o2"), "--bundle", bundle)
    assert r.returncode == run_engine.EXIT_USAGE and "--fallback-queries" in r.stderr
    # With the fallback: class queries; silence in, silence out, said clearly.
    out = tmp_path / "o3"
    r = engine("--input", str(no_video), "--out", str(out), "--bundle", bundle,
               "--fallback-queries", "violin,flute")
    assert r.returncode == 0, r.stderr
    files = outputs(out)
    assert set(files) == {"violin", "flute"}
    assert all(len(x) == SR and not np.abs(x).any() for x in files.values())
    assert "silent" in r.stderr


def test_truncated_file_keeps_outputs_valid(bundle: str, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mkv", 3.0)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size * 2 // 3])
    out = tmp_path / "sep"
    r = engine("--input", str(cut), "--out", str(out), "--bundle", bundle)
    # A truncated file ends early (FFmpeg reads what is there): documented exit 0.
    assert r.returncode == 0, r.stderr
    files = outputs(out)
    assert files and all(0 < len(x) <= 3 * SR and np.isfinite(x).all() for x in files.values())
    assert len({len(x) for x in files.values()}) == 1
    json.loads((out / "summary.json").read_text())


# ----------------------------------------------------------------------------- live
def _pulse_ready() -> str | None:
    """None when PulseAudio answers (started here if needed), else why not."""
    if shutil.which("pactl") is None or shutil.which("pulseaudio") is None:
        return "pulseaudio / pactl not installed"
    if subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
        subprocess.run(["pulseaudio", "-D", "--exit-idle-time=-1"], capture_output=True)
        time.sleep(1.0)
        if subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
            return "pulseaudio could not start"
    return None


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_live_mic_from_a_null_sink_and_tcp_video(bundle: str, tmp_path: Path) -> None:
    why = _pulse_ready()
    if why:
        pytest.skip(why)
    sink = f"iq_test_{os.getpid()}"
    mod = subprocess.run(["pactl", "load-module", "module-null-sink", f"sink_name={sink}"],
                         capture_output=True, text=True)
    if mod.returncode != 0:
        pytest.skip(f"cannot load a null sink: {mod.stderr.strip()}")
    clip = write_clip(tmp_path / "clip.mkv", 30.0)
    mix = tmp_path / "mix.wav"
    t = np.arange(30 * 44100) / 44100
    wavfile.write(mix, 44100, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-i", str(clip), "-an",
                          "-c:v", "mpeg2video", "-f", "mpegts",
                          f"tcp://127.0.0.1:{port}?listen=1"], stdin=subprocess.DEVNULL),
        subprocess.Popen(["paplay", f"--device={sink}", str(mix)]),
    ]
    out = tmp_path / "sep"
    try:
        time.sleep(1.0)
        r = engine("--input", "mic:pulse", "--video", f"tcp://127.0.0.1:{port}", "--out",
                   str(out), "--bundle", bundle, "--duration", "20", "--run-dir",
                   str(tmp_path / "run"),
                   env={"PULSE_SOURCE": f"{sink}.monitor"}, timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["pactl", "unload-module", mod.stdout.strip()], capture_output=True)
    assert r.returncode == 0, r.stderr
    files = outputs(out)
    assert set(files) == {"accordion#1", "acoustic_guitar#1"}
    assert all(len(x) > SR for x in files.values())
    s = json.loads((out / "summary.json").read_text())
    assert s["live"] is True and s["timings"]["end_to_end_ms"]["n"] > 0
    # The mic carried the tone: the outputs are not silent.
    assert max(np.abs(x).max() for x in files.values()) > 1e-3


# ---------------------------------------------------------------------- latency bookkeeping
@pytest.mark.parametrize("source_block,block,lookahead", [(1024, 4, 4), (512, 2, 2), (256, 1, 0),
                                                          (640, 2, 3)])
def test_algorithmic_latency_follows_the_real_chain(source_block: int, block: int,
                                                    lookahead: int) -> None:
    """The closed form against the chain's own streaming STFT / inverse STFT, fed zeros."""
    import torch

    from models.spectral import N_BINS, StreamingISTFT, StreamingSTFT

    got = run_engine.algorithmic_latency_ms(source_block, block, lookahead)
    stft, istft = StreamingSTFT(), StreamingISTFT()
    pending = sent = emitted = 0
    ready: list[int] = []  # per output sample: input samples captured when it came out
    for m in range(1, 20_000 // source_block + 2):
        pending += stft.push(np.zeros(source_block, np.float32)).shape[1]
        sent, pending = sent + pending // block * block, pending % block
        while sent >= emitted + block + lookahead:
            n = istft.push(torch.zeros(N_BINS, block, dtype=torch.complex64)).shape[-1]
            ready += [m * source_block] * n
            emitted += block
    period = math.lcm(source_block, block * 256)
    i = np.arange(2 * period, 4 * period)
    ms = (np.asarray(ready)[i] - i) * 1000.0 / SR
    assert got["total"] == pytest.approx(ms.max()) and got["min"] == pytest.approx(ms.min())
    assert got["p50"] == pytest.approx(np.percentile(ms, 50))


def test_capture_latency_joins_capture_and_write_logs(tmp_path: Path) -> None:
    # Samples captured at 100 s + i / SR; chunk [0, 256) written at 100.1 s, [256, 512) later.
    (tmp_path / run_engine.CAPTURE_LOG).write_text(json.dumps(
        {"method": "realtime file", "anchors": [[0, 100.0], [256, 100.0 + 256 / SR]]}))
    (tmp_path / run_engine.WRITE_LOG).write_text(json.dumps(
        {"writes": {"a#1": [[0, 256, 100.1], [256, 256, 100.2]]}}))
    got = run_engine.capture_latency_ms(tmp_path, stride=1)
    lat = np.concatenate([100.1 - (100.0 + np.arange(256) / SR),
                          100.2 - (100.0 + np.arange(256, 512) / SR)]) * 1000
    assert got["n"] == 512 and got["p50"] == pytest.approx(np.percentile(lat, 50))
    assert got["max"] == pytest.approx(lat.max())
    (tmp_path / run_engine.CAPTURE_LOG).write_text(json.dumps(
        {"method": "emit time", "anchors": [[255, 1.0]]}))
    assert run_engine.capture_latency_ms(tmp_path) is None  # no capture clock: no figure


def test_live_inputs_get_the_live_stream_defaults(tmp_path: Path) -> None:
    info = {"stream": {"window": 64, "block": 4, "lookahead": 8}, "visual": {"fps": 8}}
    parse = run_engine.build_parser().parse_args
    for argv, live in ((["--input", "a.mkv"], False), (["--input", "a.mkv", "--realtime"], True),
                       (["--input", "mic"], True), (["--input", "-", "--video", "camera"], True),
                       (["--input", "mic", "--video", "tcp://127.0.0.1:5000"], True)):
        args = parse([*argv, "--out", str(tmp_path)])
        assert run_engine.is_live_input(args) is live
        run_engine.apply_stream_defaults(args, info, live)
        want = run_engine.LIVE_STREAM if live else {"block": 4, "lookahead": 8,
                                                     "source_block": 4 * 256}
        assert (args.block, args.lookahead, args.source_block) == tuple(want.values())
        graph = tomllib.loads(run_engine.default_graph(
            args, tmp_path, info, tmp_path, {"kind": "file", "path": "a.mkv"}, None, live))
        assert graph["nodes"]["separator"]["params"]["blend"] is not live  # files blend
    args = parse(["--input", "mic", "--block", "3", "--lookahead", "0"])  # given values win
    run_engine.apply_stream_defaults(args, info, True)
    assert (args.block, args.lookahead, args.source_block) == (3, 0, 256)
