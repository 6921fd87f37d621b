"""Sources: any FFmpeg input (file or stdin pipe) and a sound-card microphone.

FileSource decodes with PyAV in a background thread (a pipe may block on read; the node loop
must stay responsive to stop), averages the channels to mono and resamples to 11025 Hz with PyAV's
AudioResampler, and emits AudioChunks of ``block`` samples (the last one may be shorter). With
``video_fps`` set it also emits RGB uint8 VideoFrames at that rate on its "video" port, so one
file feeds both paths. Non-finite samples (NaN/inf, possible in float WAVs) are replaced by 0 and
counted in ``counters["nonfinite_samples"]`` (``nonfinite="error"`` raises instead): one bad
sample must not silence a live engine, but it must not pass unseen either.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Any

import numpy as np

from engine.messages import AudioChunk, EndOfStream, VideoFrame
from engine.node import Node, Outputs
from models.spectral import SAMPLE_RATE

NONFINITE_POLICIES = ("zero", "error")
_QUEUE_ITEMS = 256  # decoded items buffered ahead of the node loop (a few seconds of audio)


def _resampler() -> Any:
    import av

    # Channels are kept (planar) and averaged here: FFmpeg's own downmix adds channels at
    # -3 dB, which makes a centred stereo source 3 dB louder than either channel and can clip.
    return av.AudioResampler(format="fltp", rate=SAMPLE_RATE)


def _resampled(resampler: Any, frame: Any) -> list[np.ndarray]:
    """Mono float32 arrays (channel mean) of one decoded frame (None flushes the resampler)."""
    return [f.to_ndarray().mean(axis=0, dtype=np.float32) for f in resampler.resample(frame)]


class _Blocker:
    """Cuts a sample stream into fixed blocks; counts and zeroes non-finite samples."""

    def __init__(self, node: Node, stream: str, block: int, nonfinite: str) -> None:
        self.node, self.stream, self.block, self.nonfinite = node, stream, block, nonfinite
        self.parts: list[np.ndarray] = []
        self.n = 0
        self.sample_index = 0

    def add(self, x: np.ndarray) -> None:
        bad = ~np.isfinite(x)
        if bad.any():
            if self.nonfinite == "error":
                raise ValueError(f"stream {self.stream!r}: {int(bad.sum())} non-finite samples "
                                 f"near sample {self.sample_index + self.n}")
            self.node.counters["nonfinite_samples"] += int(bad.sum())
            x = np.where(bad, np.float32(0), x)
        self.parts.append(x)
        self.n += x.size

    def take(self, final: bool = False) -> list[AudioChunk]:
        out = []
        if self.n < self.block and not (final and self.n):
            return out
        data = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        while data.size >= self.block or (final and data.size):
            n = min(self.block, data.size)
            out.append(AudioChunk(stream=self.stream, sample_index=self.sample_index,
                                  samples=np.ascontiguousarray(data[:n], np.float32),
                                  sample_rate=SAMPLE_RATE))
            self.sample_index += n
            data = data[n:]
        self.parts, self.n = ([data] if data.size else []), data.size
        return out


class FileSource(Node):
    """Audio (and optionally video) of any FFmpeg input; ``path="-"`` reads stdin.

    ``format`` forces the container format (stdin defaults to "matroska"; use "mpegts" for a
    transport stream). ``realtime`` paces audio at its media rate; otherwise as fast as the
    outputs accept. ``video_size`` = (width, height) rescales frames.
    """

    inputs: dict[str, str] = {}
    outputs = {"audio": "push", "video": "pub"}
    tick_interval = 0.0

    def __init__(self, *, path: str, stream: str = "mix", block: int = 1024,
                 realtime: bool = False, video_fps: float | None = None,
                 video_size: list[int] | None = None, format: str | None = None,
                 nonfinite: str = "zero") -> None:
        super().__init__()
        if block < 1:
            raise ValueError(f"block must be >= 1 sample, got {block}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite {nonfinite!r}; allowed: {list(NONFINITE_POLICIES)}")
        if video_fps is not None and video_fps <= 0:
            raise ValueError(f"video_fps must be > 0 or None, got {video_fps}")
        self.path, self.stream, self.block, self.realtime = path, stream, block, realtime
        self.video_fps, self.video_size, self.format = video_fps, video_size, format
        self.nonfinite = nonfinite
        if realtime:
            self.tick_interval = block / SAMPLE_RATE / 4
        self.container: Any = None
        self._q: queue.Queue = queue.Queue(maxsize=_QUEUE_ITEMS)
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    def start(self) -> None:
        """Open the input (errors here are clear: no file, no audio stream) and start decoding."""
        import av

        src: Any = sys.stdin.buffer if self.path == "-" else self.path
        fmt = self.format or ("matroska" if self.path == "-" else None)
        try:
            self.container = av.open(src, mode="r", format=fmt)
        except (av.error.FFmpegError, OSError) as exc:
            raise ValueError(f"FileSource cannot open {self.path!r}: {exc}") from exc
        if not self.container.streams.audio:
            kinds = [s.type for s in self.container.streams]
            raise ValueError(f"{self.path!r} has no audio stream (streams: {kinds})")
        self._blocker = _Blocker(self, self.stream, self.block, self.nonfinite)
        self._t0: float | None = None
        self._thread = threading.Thread(target=self._decode, name="decode", daemon=True)
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._halt.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode(self) -> None:
        try:
            resampler = _resampler()
            want = {"audio": 0}
            if self.video_fps is not None and self.container.streams.video:
                want["video"] = 0
            next_video_ns = 0
            step_ns = int(1e9 / self.video_fps) if self.video_fps else 0
            for frame in self.container.decode(**want):
                if self._halt.is_set():
                    return
                if frame.__class__.__name__ == "AudioFrame":
                    for x in _resampled(resampler, frame):
                        self._put(("audio", x))
                elif frame.time is not None and frame.time * 1e9 >= next_video_ns:
                    pts_ns = int(round(frame.time * 1e9))
                    next_video_ns = max(next_video_ns + step_ns, pts_ns)
                    if self.video_size:
                        frame = frame.reformat(width=self.video_size[0],
                                               height=self.video_size[1])
                    self._put(("video", pts_ns, frame.to_ndarray(format="rgb24")))
            for x in _resampled(resampler, None):
                self._put(("audio", x))
            self._put(("end", "eof"))
        except Exception as exc:  # re-raised in the node loop, where the supervisor sees it
            self._put(("error", exc))

    def tick(self) -> Outputs:
        """Emit the blocks (and frames) that are decoded and, when realtime, due."""
        if self._t0 is None:
            self._t0 = self.clock()
        budget = 64  # items per tick: keeps the loop responsive to inputs and stop
        while budget:
            due = (self.clock() - self._t0) * SAMPLE_RATE
            if self.realtime and self._blocker.sample_index + self._blocker.n >= due:
                break  # decoded audio is ahead of the wall clock: wait
            try:
                item = self._q.get(timeout=0.05 if budget == 64 else 0)
            except queue.Empty:
                break
            budget -= 1
            if item[0] == "audio":
                self._blocker.add(item[1])
                for chunk in self._blocker.take():
                    yield "audio", chunk
            elif item[0] == "video":
                yield "video", VideoFrame(stream=self.stream, pts_ns=item[1], image=item[2])
            elif item[0] == "error":
                raise item[1]
            else:
                for chunk in self._blocker.take(final=True):
                    yield "audio", chunk
                yield "audio", EndOfStream(stream=self.stream, reason=item[1],
                                           time=self._blocker.sample_index)
                self.exhausted = True
                return

    def stop(self) -> None:
        """Stop the decoding thread and close the input."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self.container is not None:
            self.container.close()
            self.container = None


class MicSource(Node):
    """A sounddevice InputStream: AudioChunks of ``block`` samples at 11025 Hz.

    ``device``: name or index (None: the default input). The card runs at ``capture_rate``
    (None: its default rate) and PyAV resamples to 11025 Hz. When the device stops (unplugged,
    stream aborted), the node emits ``EndOfStream(reason="device stopped")`` and ends.
    """

    inputs: dict[str, str] = {}
    outputs = {"audio": "push"}
    tick_interval = 0.01

    def __init__(self, *, device: str | int | None = None, stream: str = "mic",
                 block: int = 1024, capture_rate: int | None = None,
                 nonfinite: str = "zero") -> None:
        super().__init__()
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite {nonfinite!r}; allowed: {list(NONFINITE_POLICIES)}")
        self.device, self.stream, self.block = device, stream, block
        self.capture_rate, self.nonfinite = capture_rate, nonfinite
        self.sd_stream: Any = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def start(self) -> None:
        """Open the device and start capturing."""
        import sounddevice as sd

        info = sd.query_devices(self.device, "input")
        rate = self._rate = self.capture_rate or int(info["default_samplerate"])
        self._resampler = _resampler()
        self._blocker = _Blocker(self, self.stream, self.block, self.nonfinite)
        self.sd_stream = sd.InputStream(
            samplerate=rate, channels=1, dtype="float32", device=self.device,
            callback=self._callback, finished_callback=lambda: self._q.put(None),
        )
        self.sd_stream.start()

    def _callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        if status:
            self.counters["device_status"] += 1  # overflow: the node loop fell behind
        self._q.put(indata[:, 0].copy())

    def tick(self) -> Outputs:
        """Resample what the callback queued and emit full blocks."""
        import av

        while True:
            try:
                x = self._q.get_nowait()
            except queue.Empty:
                return
            if x is None:
                for chunk in self._blocker.take(final=True):
                    yield "audio", chunk
                yield "audio", EndOfStream(stream=self.stream, reason="device stopped",
                                           time=self._blocker.sample_index)
                self.exhausted = True
                return
            frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self._rate
            for y in _resampled(self._resampler, frame):
                self._blocker.add(y)
            for chunk in self._blocker.take():
                yield "audio", chunk

    def stop(self) -> None:
        """Close the device."""
        if self.sd_stream is not None:
            self.sd_stream.close()
            self.sd_stream = None
