"""FileSource (WAV, resampling, video, stdin, bad input), WavSink, TapSink, MicSource (faked)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import scipy.io.wavfile as wavfile
import zmq

from engine.messages import AudioChunk, EndOfStream, VideoFrame
from engine.testing import ManualClock, run_node
from engine.transport import Receiver
from nodes.sinks import MonitorSink, TapSink, WavSink, safe_filename
from nodes.sources import FileSource, MicSource

SR = 11025
rng = np.random.default_rng(0)
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


def _audio(outputs) -> np.ndarray:
    return np.concatenate([m.samples for p, m in outputs if isinstance(m, AudioChunk)])


def test_wav_at_engine_rate_is_passed_exactly(tmp_path):
    x = (0.5 * rng.standard_normal(5000)).astype(np.float32)
    wavfile.write(tmp_path / "a.wav", SR, x)
    out = run_node(FileSource(path=str(tmp_path / "a.wav"), block=1024, stream="s"))
    chunks = [m for _, m in out if isinstance(m, AudioChunk)]
    assert [len(c.samples) for c in chunks] == [1024] * 4 + [904]
    assert [c.sample_index for c in chunks] == [0, 1024, 2048, 3072, 4096]
    assert np.array_equal(_audio(out), x)
    assert isinstance(out[-1][1], EndOfStream) and out[-1][1].time == 5000


def test_stereo_44k_is_downmixed_and_resampled(tmp_path):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    wavfile.write(tmp_path / "s.wav", 44100, np.stack([left, left], 1).astype(np.float32))
    y = _audio(run_node(FileSource(path=str(tmp_path / "s.wav"))))
    assert abs(len(y) - SR) <= 64
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(y)) / SR)
    assert np.abs(y[200:-200] - ref[200:-200]).max() < 0.05  # mono, same tone, same level


def test_nonfinite_samples_zeroed_and_counted_or_refused(tmp_path):
    x = np.ones(2000, np.float32)
    x[[10, 1500]] = [np.nan, np.inf]
    wavfile.write(tmp_path / "n.wav", SR, x)
    node = FileSource(path=str(tmp_path / "n.wav"))
    y = _audio(run_node(node))
    assert node.counters["nonfinite_samples"] == 2 and y[10] == 0 and y[1500] == 0
    with pytest.raises(ValueError, match="non-finite"):
        run_node(FileSource(path=str(tmp_path / "n.wav"), nonfinite="error"))


def test_missing_file_and_bad_params(tmp_path):
    with pytest.raises(ValueError, match="cannot open"):
        run_node(FileSource(path=str(tmp_path / "nope.wav")))
    with pytest.raises(ValueError, match="nonfinite"):
        FileSource(path="x", nonfinite="ignore")


@needs_ffmpeg
def test_no_audio_stream_is_a_clear_error(tmp_path):
    path = tmp_path / "v.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=5",
                    "-t", "1", str(path)], check=True)
    with pytest.raises(ValueError, match="no audio stream"):
        run_node(FileSource(path=str(path)))


@needs_ffmpeg
def test_video_frames_and_stdin_pipe(tmp_path, monkeypatch):
    path = tmp_path / "av.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10",
                    "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=22050", "-t", "2",
                    "-c:v", "mpeg4", "-c:a", "pcm_f32le", str(path)], check=True)
    out = run_node(FileSource(path=str(path), video_fps=2.0, video_size=[32, 24]))
    frames = [m for _, m in out if isinstance(m, VideoFrame)]
    assert 3 <= len(frames) <= 5 and frames[0].image.shape == (24, 32, 3)
    assert frames[0].image.dtype == np.uint8
    assert all(b.pts_ns - a.pts_ns >= 4.9e8 for a, b in zip(frames, frames[1:], strict=False))
    assert abs(len(_audio(out)) - 2 * SR) <= 128
    with open(path, "rb") as f:  # the same file through stdin ("-"), read as matroska
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=f))
        piped = _audio(run_node(FileSource(path="-")))
    assert np.array_equal(piped, _audio(out))


def test_realtime_source_follows_the_clock(tmp_path):
    wavfile.write(tmp_path / "r.wav", SR, np.zeros(SR, np.float32))
    clock = ManualClock()
    node = FileSource(path=str(tmp_path / "r.wav"), block=1024, realtime=True)
    out = run_node(node, clock=clock, tick_advance=0.01, max_ticks=50)
    assert not node.exhausted  # 0.5 s of clock: about half of the 1 s file
    n = len(_audio(out))
    assert 0.3 * SR <= n <= 0.5 * SR + 2048


def test_wav_sink_valid_at_every_chunk_and_safe_names(tmp_path):
    sink = WavSink(out_dir=str(tmp_path / "o"))
    sink.start()
    x = rng.standard_normal(3000).astype(np.float32)
    label = "violin#1/../../evil"
    for i in range(3):
        sink.handle("audio", AudioChunk(stream=label, sample_index=1000 * i,
                                        samples=x[1000 * i:1000 * (i + 1)]))
        sr, y = wavfile.read(tmp_path / "o" / f"{safe_filename(label)}.wav")
        assert sr == SR and np.array_equal(y, x[:1000 * (i + 1)])
    assert safe_filename(label) == "violin#1_.._.._evil"
    assert safe_filename("..") == "_" and safe_filename("flute#2") == "flute#2"
    # A late stream starts on the media clock; a gap is zero-filled and counted.
    sink.handle("audio", AudioChunk(stream="late", sample_index=500, samples=x[:100]))
    sink.handle("audio", AudioChunk(stream="late", sample_index=700, samples=x[:100]))
    sink.handle("audio", EndOfStream(stream="late"))
    sink.stop()
    _, y = wavfile.read(tmp_path / "o" / "late.wav")
    assert len(y) == 800 and not y[:500].any() and not y[600:700].any()
    assert sink.counters["gap_samples"] == 600


def test_wav_sink_int16(tmp_path):
    out = [("audio", AudioChunk(stream="a", sample_index=0, samples=np.full(10, 0.5, np.float32)))]
    run_node(WavSink(out_dir=str(tmp_path), dtype="int16"), out)
    _, y = wavfile.read(tmp_path / "a.wav")
    assert y.dtype == np.int16 and np.all(y == 16384)


def test_tap_sink_publishes(free_tcp_endpoint):
    tap = TapSink(endpoint=free_tcp_endpoint)
    tap.start()
    ctx = zmq.Context()
    sub = Receiver(ctx, "sub", [free_tcp_endpoint], bind_endpoint=False)
    try:
        deadline = time.monotonic() + 5
        got = []
        while not got:
            assert time.monotonic() < deadline
            tap.handle("audio", AudioChunk(stream="a", sample_index=0,
                                           samples=np.ones(8, np.float32)))
            got = sub.recv(20)
        assert got[0].stream == "a" and np.array_equal(got[0].samples, np.ones(8))
    finally:
        sub.close()
        ctx.term()
        tap.stop()
    with pytest.raises(Exception, match="CURVE"):
        TapSink(endpoint="tcp://0.0.0.0:5599").start()


def test_mic_source_with_a_fake_device(monkeypatch):
    class FakeStream:
        def __init__(self, *, samplerate, callback, finished_callback, **kw):
            self.rate, self.cb, self.fin = samplerate, callback, finished_callback

        def start(self):
            for _ in range(10):  # 10 x 2205 samples at 22050 Hz = 1 s
                self.cb(np.ones((2205, 1), np.float32) * 0.25, 2205, None, None)
            self.fin()  # the device stops

        def close(self):
            pass

    fake = types.SimpleNamespace(InputStream=FakeStream,
                                 query_devices=lambda d, k: {"default_samplerate": 22050.0})
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    node = MicSource(block=512)
    out = run_node(node)
    assert abs(len(_audio(out)) - SR) <= 64
    assert np.allclose(_audio(out)[100:-100], 0.25, atol=1e-3)
    assert out[-1][1].reason == "device stopped" and node.exhausted


def test_monitor_sink_with_a_fake_device(monkeypatch):
    class FakeOut:
        def __init__(self, *, channels, callback, **kw):
            self.channels, self.cb = channels, callback

        def start(self):
            pass

        def stop(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(OutputStream=FakeOut))
    node = MonitorSink(labels=["a", "b"])
    node.start()
    node.handle("audio", AudioChunk(stream="a", sample_index=0, samples=np.ones(300, np.float32)))
    node.handle("audio", AudioChunk(stream="c", sample_index=0, samples=np.ones(300, np.float32)))
    out = np.full((256, 2), 9.0, np.float32)
    node.stream.cb(out, 256, None, None)
    assert np.all(out[:, 0] == 1.0) and np.all(out[:, 1] == 0.0)  # "b" has nothing: silence
    node.stream.cb(out, 256, None, None)
    assert np.all(out[:44, 0] == 1.0) and np.all(out[44:, 0] == 0.0)
    assert node.counters["underrun_samples"] == 256 + 256 + 212
    node.stop()


def test_realtime_blocks_leave_when_due_and_log_their_capture_time(tmp_path):
    wavfile.write(tmp_path / "r.wav", SR, np.zeros(3000, np.float32))
    clock = ManualClock(100.0)
    log = tmp_path / "capture.json"
    node = FileSource(path=str(tmp_path / "r.wav"), block=1024, realtime=True,
                      capture_log=str(log))
    node.clock = clock
    node.start()
    got: list[tuple[float, AudioChunk]] = []
    try:
        for _ in range(400):
            for _, m in node.tick():
                if isinstance(m, AudioChunk):
                    got.append((clock.now, m))
            if node.exhausted:
                break
            clock.advance(0.001)
            time.sleep(0.0005)  # let the decoding thread fill its queue
    finally:
        node.stop()
    assert node.exhausted and [m.sample_index for _, m in got] == [0, 1024, 2048]
    for t, m in got:  # never before its last sample exists, at most one tick after
        due = 100.0 + (m.sample_index + len(m.samples)) / SR
        assert due - 1e-9 <= t <= due + 0.0011
    anchors = json.loads(log.read_text())["anchors"]
    assert anchors == [[i, pytest.approx(100.0 + i / SR)] for i in (0, 1024, 2048)]


def test_mic_capture_times_from_adc_time_or_buffer_length(monkeypatch, tmp_path):
    class FakeStream:
        def __init__(self, *, samplerate, callback, finished_callback, **kw):
            self.cb, self.fin = callback, finished_callback

        def start(self):
            t = types.SimpleNamespace(inputBufferAdcTime=50.0, currentTime=50.03)
            self.cb(np.zeros((2205, 1), np.float32), 2205, t, None)  # ADC time: 30 ms ago
            self.cb(np.zeros((2205, 1), np.float32), 2205, None, None)  # none: one buffer ago
            self.fin()

        def close(self):
            pass

    fake = types.SimpleNamespace(InputStream=FakeStream,
                                 query_devices=lambda d, k: {"default_samplerate": 22050.0})
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    node = MicSource(block=512, capture_log=str(tmp_path / "c.json"))
    run_node(node, clock=ManualClock(7.0))
    log = json.loads((tmp_path / "c.json").read_text())
    assert log["anchors"] == [[0.0, pytest.approx(6.97)], [1102.5, pytest.approx(6.9)]]
    assert node.counters["capture_time_fallback"] == 1


def test_wav_sink_logs_when_each_chunk_is_written(tmp_path):
    clock = ManualClock(5.0)
    sink = WavSink(out_dir=str(tmp_path / "o"), latency_log=str(tmp_path / "w.json"))
    sink.clock = clock
    sink.start()
    for i in range(2):
        clock.advance(0.1)
        sink.handle("audio", AudioChunk(stream="a#1", sample_index=256 * i,
                                        samples=np.zeros(256, np.float32)))
    sink.stop()
    log = json.loads((tmp_path / "w.json").read_text())
    assert log["writes"] == {"a#1": [[0, 256, pytest.approx(5.1)], [256, 256, pytest.approx(5.2)]]}
