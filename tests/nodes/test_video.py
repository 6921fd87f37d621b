"""CameraSource: frames resampled to fps with media-time pts, every kind of end becomes an
EndOfStream with a reason (never a hang): end of file, no input, no video, a stream that dies."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest

from engine.messages import EndOfStream, VideoFrame
from nodes.video import CameraSource, is_live, resolve_input


def write_video(path: Path, seconds: float = 2.0, fps: int = 25, audio_only: bool = False) -> Path:
    with av.open(str(path), "w") as c:
        if audio_only:
            a = c.add_stream("pcm_s16le", rate=11025, layout="mono")
            x = (np.sin(np.arange(int(11025 * seconds)) * 0.1) * 3000).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(x[None], format="s16", layout="mono")
            frame.sample_rate = 11025
            for p in a.encode(frame):
                c.mux(p)
            for p in a.encode(None):
                c.mux(p)
            return path
        v = c.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((48, 64, 3), (i * 9) % 255, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    return path


def drain(node: CameraSource, timeout: float = 20.0) -> list:
    """Start the node and tick it on the real clock until it ends (or fail after timeout)."""
    out = []
    node.start()
    try:
        deadline = time.monotonic() + timeout
        while not node.exhausted:
            assert time.monotonic() < deadline, "CameraSource did not end"
            out.extend(m for _, m in node.tick())
            time.sleep(0.005)
    finally:
        node.stop()
    return out


def test_resolve_input() -> None:
    assert resolve_input("camera") == ("/dev/video0", "v4l2")
    assert resolve_input("/dev/video2") == ("/dev/video2", "v4l2")
    assert resolve_input("tcp://h:1") == ("tcp://h:1", None)
    assert is_live("udp://x:1") and not is_live("clip.mkv")


def test_file_frames_are_resampled_with_media_time(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mkv", seconds=2.0, fps=25)
    out = drain(CameraSource(url=str(path), fps=8, size=[32, 24]))
    frames = [m for m in out if isinstance(m, VideoFrame)]
    assert isinstance(out[-1], EndOfStream) and out[-1].reason == "eof"
    pts = np.array([f.pts_ns for f in frames]) / 1e9
    assert pts[0] == 0 and 15 <= len(frames) <= 17
    # 8 fps taken from 25 fps: the first frame at or after each 1/8 s instant
    assert np.all(np.diff(pts) > 0.119) and np.all(np.diff(pts) < 0.165)
    assert frames[0].image.shape == (24, 32, 3) and frames[0].image.dtype == np.uint8


def test_realtime_paces_a_file(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mkv", seconds=1.0, fps=8)
    t0 = time.monotonic()
    out = drain(CameraSource(url=str(path), fps=8, realtime=True))
    assert time.monotonic() - t0 >= 0.8 and len(out) == 9


@pytest.mark.parametrize("case", ["missing", "audio_only"])
def test_unusable_input_ends_with_a_reason(tmp_path: Path, case: str) -> None:
    url = str(tmp_path / "nothing.mkv") if case == "missing" else \
        str(write_video(tmp_path / "a.mkv", audio_only=True))
    node = CameraSource(url=url, fps=8)
    out = drain(node)
    assert len(out) == 1 and isinstance(out[0], EndOfStream)
    assert ("cannot open" if case == "missing" else "no video stream") in out[0].reason
    assert node.counters["input_lost"] == 1


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_tcp_stream_that_dies_ends_without_hang(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "v.mkv", seconds=20.0, fps=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-re", "-i", str(clip), "-c:v", "mpeg2video",
         "-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # ffmpeg listening
        node = CameraSource(url=f"tcp://127.0.0.1:{port}", fps=8, read_timeout_s=2.0)
        node.start()
        frames = []
        deadline = time.monotonic() + 15
        while len(frames) < 4:
            assert time.monotonic() < deadline, "no frame from the stream"
            frames.extend(m for _, m in node.tick())
            time.sleep(0.01)
        assert frames[0].pts_ns == 0  # a live stream starts at 0 whatever its mpegts clock
        server.kill()  # the camera disappears
        t0 = time.monotonic()
        end = None
        while end is None:
            assert time.monotonic() - t0 < 10, "no EndOfStream after the stream died"
            end = next((m for _, m in list(node.tick()) if isinstance(m, EndOfStream)), None)
            time.sleep(0.01)
        assert node.exhausted and end.reason
        node.stop()
    finally:
        server.kill()
        server.wait()
