"""Sources: any FFmpeg input (file or stdin pipe) and a sound-card microphone.

FileSource decodes with PyAV in a background thread (a pipe may block on read; the node loop
must stay responsive to stop), averages the channels to mono and resamples to 11025 Hz with PyAV's
AudioResampler, and emits AudioChunks of ``block`` samples (the last one may be shorter). With
``video_fps`` set it also emits RGB uint8 VideoFrames at that rate on its "video" port, so one
file feeds both paths. Non-finite samples (NaN/inf, possible in float WAVs) are replaced by 0 and
counted in ``counters["nonfinite_samples"]`` (``nonfinite="error"`` raises instead): one bad
sample must not silence a live engine, but it must not pass unseen either.

Capture clock: with ``capture_log`` set, a source writes (at stop) JSON anchors
``[[sample_index, t], ...]`` saying that sample ``sample_index`` of its 11025 Hz stream was
captured at ``time.monotonic()`` ``t`` (one clock for every process of a host). A sink that logs
when it writes each output sample (nodes.sinks.WavSink ``latency_log``) then gives the true
capture-to-output latency per sample (scripts/bench_live.py joins the two). A real-time file
is "captured" at ``start + index / 11025``; a microphone sample when the sound card's ADC took
it (PortAudio's ``inputBufferAdcTime``, mapped to the monotonic clock).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from engine.messages import AudioChunk, EndOfStream, VideoFrame
from engine.node import Node, Outputs, put_until_halted
from models.spectral import SAMPLE_RATE

NONFINITE_POLICIES = ("zero", "error")
_QUEUE_ITEMS = 256  # decoded items buffered ahead of the node loop (a few seconds of audio)


def _resampler() -> Any:
    import av

    # Channels are kept (planar) and averaged here: FFmpeg's own downmix adds channels at
    # -3 dB, which makes a centred stereo source 3 dB louder than either channel and can clip.
    return av.AudioResampler(format="fltp", rate=SAMPLE_RATE)


class _CaptureLog:
    """Anchors (sample index, monotonic capture time), kept compact, written once at stop."""

    MAX_ANCHORS = 250_000  # 4 MB at most: ~40 min of 100 callbacks per second (then no more)

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.data = array("d")

    def add(self, sample_index: float, t: float) -> None:
        if self.path is not None and len(self.data) < 2 * self.MAX_ANCHORS:
            self.data.extend((sample_index, t))

    def write(self, method: str) -> None:
        if self.path is None:
            return
        pairs = np.frombuffer(self.data, np.float64).reshape(-1, 2).tolist() if self.data else []
        Path(self.path).write_text(json.dumps({"clock": "monotonic", "method": method,
                                               "sample_rate": SAMPLE_RATE, "anchors": pairs}))


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

    def take(self, final: bool = False, upto: float | None = None) -> list[AudioChunk]:
        """Full blocks (and, when ``final``, the rest); with ``upto`` only blocks that end at
        or before sample ``upto`` (a real-time source: blocks whose samples all exist now)."""
        out = []
        if self.n < self.block and not (final and self.n):
            return out
        data = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        while data.size >= self.block or (final and data.size):
            n = min(self.block, data.size)
            if upto is not None and self.sample_index + n > upto:
                break
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
                 nonfinite: str = "zero", capture_log: str | None = None) -> None:
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
        self.capture_log = capture_log
        if realtime:
            # A block leaves at the first tick after its last sample is due: a coarse tick
            # would add up to one tick of latency that a sound card's callback does not have.
            self.tick_interval = min(block / SAMPLE_RATE / 4, 0.005)
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
        self._ended: str | None = None  # the decoder's end, held until the tail is due
        self._capture = _CaptureLog(self.capture_log)
        self._thread = threading.Thread(target=self._decode, name="decode", daemon=True)
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        return put_until_halted(self._q, item, self._halt)

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
        budget = 0 if self._ended is not None else 64  # items per tick: stays responsive
        due: float | None = None
        if self.realtime:
            # Samples that exist by now: a block whose end is later waits for the clock.
            due = (self.clock() - self._t0) * SAMPLE_RATE
            for chunk in self._blocker.take(upto=due):
                yield "audio", self._captured(chunk)
        while budget:
            if due is not None and self._blocker.sample_index + self._blocker.n >= due:
                break  # decoded audio is ahead of the wall clock: wait
            try:
                item = self._q.get(timeout=0.05 if budget == 64 else 0)
            except queue.Empty:
                break
            budget -= 1
            if item[0] == "audio":
                self._blocker.add(item[1])
                for chunk in self._blocker.take(upto=due):
                    yield "audio", self._captured(chunk)
            elif item[0] == "video":
                yield "video", VideoFrame(stream=self.stream, pts_ns=item[1], image=item[2])
            elif item[0] == "error":
                raise item[1]
            else:
                self._ended = item[1]
                break
        if self._ended is not None:
            end = self._blocker.sample_index + self._blocker.n
            if due is not None and due < end:
                return  # the tail too leaves only once it is due
            for chunk in self._blocker.take(final=True):
                yield "audio", self._captured(chunk)
            yield "audio", EndOfStream(stream=self.stream, reason=self._ended,
                                       time=self._blocker.sample_index)
            self.exhausted = True

    def _captured(self, chunk: AudioChunk) -> AudioChunk:
        """Log the chunk's capture anchor: its media time when real-time, else its emit time
        (a file read as fast as possible has no capture clock; the anchor then says when the
        last sample of the chunk entered the graph)."""
        if self.realtime and self._t0 is not None:
            self._capture.add(chunk.sample_index, self._t0 + chunk.sample_index / SAMPLE_RATE)
        else:
            self._capture.add(chunk.sample_index + len(chunk.samples) - 1, self.clock())
        return chunk

    def stop(self) -> None:
        """Stop the decoding thread, close the input, write the capture log."""
        if getattr(self, "_capture", None) is not None:
            self._capture.write("realtime file" if self.realtime else "emit time")
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
    ``capture_log``: where to write the capture anchors (module docstring); a callback's first
    sample was taken ``currentTime - inputBufferAdcTime`` before the callback ran, or, when the
    host API gives no ADC time, one buffer (``frames / rate``) before it (counted in
    ``counters["capture_time_fallback"]``). ``blocksize``: frames per callback (0: the host's).
    """

    inputs: dict[str, str] = {}
    outputs = {"audio": "push"}
    tick_interval = 0.01

    def __init__(self, *, device: str | int | None = None, stream: str = "mic",
                 block: int = 1024, capture_rate: int | None = None,
                 nonfinite: str = "zero", capture_log: str | None = None,
                 blocksize: int = 0) -> None:
        super().__init__()
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite {nonfinite!r}; allowed: {list(NONFINITE_POLICIES)}")
        if blocksize < 0:
            raise ValueError(f"blocksize must be >= 0 frames (0: the host's), got {blocksize}")
        self.device, self.stream, self.block = device, stream, block
        self.capture_rate, self.nonfinite = capture_rate, nonfinite
        self.capture_log, self.blocksize = capture_log, blocksize
        self.sd_stream: Any = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def start(self) -> None:
        """Open the device and start capturing."""
        import sounddevice as sd

        info = sd.query_devices(self.device, "input")
        rate = self._rate = self.capture_rate or int(info["default_samplerate"])
        self._resampler = _resampler()
        self._blocker = _Blocker(self, self.stream, self.block, self.nonfinite)
        self._capture = _CaptureLog(self.capture_log)
        self._n_in = 0  # samples at the card's rate so far
        self.sd_stream = sd.InputStream(
            samplerate=rate, channels=1, dtype="float32", device=self.device,
            blocksize=self.blocksize, callback=self._callback,
            finished_callback=lambda: self._q.put(None),
        )
        self.sd_stream.start()

    def _callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        arrival = self.clock()
        if status:
            self.counters["device_status"] += 1  # overflow: the node loop fell behind
        # PortAudio's stream clock has its own origin: only the difference of its two times
        # is used, against our monotonic clock at the callback.
        age = None
        if time is not None:
            adc, now = float(time.inputBufferAdcTime), float(time.currentTime)
            if adc > 0 and now > 0 and 0 <= now - adc < 1.0:
                age = now - adc
        if age is None:
            self.counters["capture_time_fallback"] += 1
            age = frames / self._rate
        self._q.put((indata[:, 0].copy(), arrival - age))

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
            x, t_first = x
            # Index of this buffer's first sample on the 11025 Hz clock (the resampler's own
            # delay, a few output samples, is not counted).
            self._capture.add(self._n_in * SAMPLE_RATE / self._rate, t_first)
            self._n_in += x.size
            frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self._rate
            for y in _resampled(self._resampler, frame):
                self._blocker.add(y)
            for chunk in self._blocker.take():
                yield "audio", chunk

    def stop(self) -> None:
        """Close the device, write the capture log."""
        if self.sd_stream is not None:
            self.sd_stream.close()
            self.sd_stream = None
        if getattr(self, "_capture", None) is not None:
            fallback = self.counters["capture_time_fallback"]
            self._capture.write("callback arrival - buffer" if fallback else "adc time")
