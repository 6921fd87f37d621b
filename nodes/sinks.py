"""Sinks of separated audio: WAV files, a sound-card monitor and a ZeroMQ tap.

* WavSink: one WAV per stream id (``<out_dir>/violin#1.wav``), float32 or int16. The RIFF header
  is rewritten after every chunk, so the file is valid at any moment (a crash loses at most the
  chunk being written). Chunks are placed on the stream's sample clock: a stream that starts at
  sample k gets k leading zeros, a gap in ``sample_index`` is zero-filled and counted.
  With ``latency_log`` set it also records, per chunk, when its samples were written
  (``time.monotonic()`` after the flush) and writes them as JSON at stop: joined with a source's
  capture log (nodes.sources) this is the capture-to-output latency of every sample.
* MonitorSink: a sounddevice OutputStream; one stream id per output channel.
* TapSink: re-publishes AudioChunks on a ZeroMQ PUB socket with the engine codec (topic
  ``audio/<stream>``), bound on loopback unless CURVE keys are given.
"""

from __future__ import annotations

import json
import queue
import re
import struct
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from engine.messages import AudioChunk, EndOfStream, Message
from engine.node import Node, Outputs
from engine.transport import CurveKeys, Sender, stop_authenticator

_UNSAFE = re.compile(r"[^A-Za-z0-9._#+-]")
WAV_DTYPES = {"float32": (3, 4), "int16": (1, 2)}  # name -> (WAVE format tag, bytes per sample)


def safe_filename(label: str) -> str:
    """A label as a file name: letters, digits and ``._#+-`` kept, anything else "_"."""
    name = _UNSAFE.sub("_", label).lstrip(".") or "_"
    return name[:120]


class WavWriter:
    """A mono WAV file whose header is valid after every write()."""

    def __init__(self, path: str | Path, sample_rate: int, dtype: str = "float32") -> None:
        if dtype not in WAV_DTYPES:
            raise ValueError(f"WAV dtype {dtype!r}; allowed: {list(WAV_DTYPES)}")
        self.tag, self.width = WAV_DTYPES[dtype]
        self.dtype = dtype
        self.sample_rate = sample_rate
        self.n_samples = 0
        self.f = open(path, "wb")  # noqa: SIM115  (closed by close(), which the sink's stop() calls)
        self._header()

    def _header(self) -> None:
        data_bytes = self.n_samples * self.width
        self.f.seek(0)
        self.f.write(b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE")
        self.f.write(b"fmt " + struct.pack("<IHHIIHH", 16, self.tag, 1, self.sample_rate,
                                           self.sample_rate * self.width, self.width,
                                           8 * self.width))
        self.f.write(b"data" + struct.pack("<I", data_bytes))
        self.f.seek(0, 2)

    def write(self, samples: np.ndarray) -> None:
        """Append float samples (n,) in [-1, 1] (int16 files clip) and update the header."""
        if self.dtype == "int16":
            data = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
        else:
            data = samples.astype("<f4", copy=False)
        self.f.write(data.tobytes())
        self.n_samples += len(samples)
        self._header()
        self.f.flush()

    def close(self) -> None:
        """Final header and close."""
        if not self.f.closed:
            self._header()
            self.f.close()


class WavSink(Node):
    """One WAV file per stream id in ``out_dir``."""

    inputs = {"audio": "pull"}
    MAX_LOGGED_CHUNKS = 150_000  # per stream: 3.6 MB at most, ~58 min of 256-sample chunks

    def __init__(self, *, out_dir: str, dtype: str = "float32", sample_rate: int = 11025,
                 latency_log: str | None = None) -> None:
        super().__init__()
        if dtype not in WAV_DTYPES:
            raise ValueError(f"WavSink dtype {dtype!r}; allowed: {list(WAV_DTYPES)}")
        self.out_dir = Path(out_dir)
        self.dtype = dtype
        self.sample_rate = sample_rate
        self.latency_log = latency_log
        self.files: dict[str, WavWriter] = {}
        self.writes: dict[str, array] = {}  # stream -> flat (first sample, n, t_written) triples

    def start(self) -> None:
        """Create the output directory."""
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def handle(self, port: str, msg: Message) -> Outputs:
        """AudioChunk -> appended at its sample index; EndOfStream -> that file closed."""
        if isinstance(msg, AudioChunk):
            w = self.files.get(msg.stream)
            if w is None:
                path = self.out_dir / f"{safe_filename(msg.stream)}.wav"
                w = self.files[msg.stream] = WavWriter(path, msg.sample_rate, self.dtype)
            if msg.sample_index > w.n_samples:
                self.counters["gap_samples"] += msg.sample_index - w.n_samples
                w.write(np.zeros(msg.sample_index - w.n_samples, np.float32))
            elif msg.sample_index < w.n_samples:
                self.counters["overlap_samples"] += w.n_samples - msg.sample_index
            if not np.all(np.isfinite(msg.samples)):
                self.counters["nonfinite_chunks"] += 1
                msg.samples = np.nan_to_num(msg.samples, nan=0.0, posinf=0.0, neginf=0.0)
            w.write(msg.samples[max(0, w.n_samples - msg.sample_index):])
            self.counters["samples"] += len(msg.samples)
            if self.latency_log is not None:
                log = self.writes.setdefault(msg.stream, array("d"))
                if len(log) < 3 * self.MAX_LOGGED_CHUNKS:
                    log.extend((msg.sample_index, len(msg.samples), self.clock()))
        elif isinstance(msg, EndOfStream) and msg.stream in self.files:
            self.files.pop(msg.stream).close()
            self.counters["closed"] += 1
        return ()

    def stop(self) -> None:
        """Close every file with a final header; write the latency log."""
        for w in self.files.values():
            w.close()
        self.files.clear()
        if self.latency_log is not None:
            writes = {k: np.frombuffer(v, np.float64).reshape(-1, 3).tolist()
                      for k, v in self.writes.items() if len(v)}
            Path(self.latency_log).write_text(json.dumps({
                "clock": "monotonic", "sample_rate": self.sample_rate,
                "columns": ["sample_index", "n_samples", "t_written"], "writes": writes}))


class MonitorSink(Node):
    """Plays streams on a sound card: ``labels[c]`` goes to output channel c.

    ``labels`` empty: the first stream seen plays on one channel. Underruns play silence and
    are counted; a queue longer than ``max_buffer_s`` drops its oldest audio (counted), so the
    monitor never drifts behind.
    """

    inputs = {"audio": "pull"}

    def __init__(self, *, labels: list[str] | None = None, device: str | int | None = None,
                 sample_rate: int = 11025, blocksize: int = 256,
                 max_buffer_s: float = 0.5) -> None:
        super().__init__()
        self.labels = list(labels or [])
        self.device = device
        self.sample_rate = sample_rate
        self.blocksize = blocksize
        self.max_buffer = int(max_buffer_s * sample_rate)
        self.stream: Any = None
        self._bufs: list[queue.SimpleQueue] = []
        self._rest: list[np.ndarray] = []

    def start(self) -> None:
        """Open the output device (sounddevice imported here: no PortAudio needed elsewhere)."""
        import sounddevice as sd

        n = max(1, len(self.labels))
        self._bufs = [queue.SimpleQueue() for _ in range(n)]
        self._rest = [np.zeros(0, np.float32) for _ in range(n)]
        self._queued = [0] * n
        self.stream = sd.OutputStream(samplerate=self.sample_rate, channels=n,
                                      device=self.device, dtype="float32",
                                      blocksize=self.blocksize, callback=self._callback)
        self.stream.start()

    def _callback(self, outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        if status:
            self.counters["device_status"] += 1
        for c, buf in enumerate(self._bufs):
            data = self._rest[c]
            while data.size < frames and not buf.empty():
                data = np.concatenate([data, buf.get_nowait()])
            if data.size < frames:
                self.counters["underrun_samples"] += frames - data.size
            n = min(frames, data.size)
            outdata[:n, c] = data[:n]
            outdata[n:, c] = 0.0
            self._rest[c] = data[n:]
            self._queued[c] -= n

    def handle(self, port: str, msg: Message) -> Outputs:
        """AudioChunk of a monitored stream -> queued for its channel."""
        if isinstance(msg, AudioChunk):
            if not self.labels:
                self.labels = [msg.stream]
            if msg.stream in self.labels:
                c = self.labels.index(msg.stream)
                if self._queued[c] > self.max_buffer:
                    self.counters["dropped_chunks"] += 1
                    return ()
                self._bufs[c].put(np.array(msg.samples, np.float32))
                self._queued[c] += len(msg.samples)
        return ()

    def stop(self) -> None:
        """Close the device."""
        if self.stream is not None:
            self.stream.stop()
            self.stream.close()
            self.stream = None


class TapSink(Node):
    """Publishes every AudioChunk / EndOfStream on ``endpoint`` for other programs."""

    inputs = {"audio": "pull"}

    def __init__(self, *, endpoint: str = "tcp://127.0.0.1:5599", hwm: int = 100,
                 server_secret: str | None = None, client_secret: str | None = None) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.hwm = hwm
        self.curve = CurveKeys(server_secret, client_secret) if server_secret and client_secret \
            else None
        self.ctx: zmq.Context | None = None
        self.pub: Sender | None = None

    def start(self) -> None:
        """Bind the PUB socket (non-loopback only with CURVE keys)."""
        self.ctx = zmq.Context()
        self.pub = Sender(self.ctx, "pub", [self.endpoint], bind_endpoint=True, hwm=self.hwm,
                          curve=self.curve)

    def handle(self, port: str, msg: Message) -> Outputs:
        """Re-publish; a slow subscriber loses chunks (PUB), the graph never waits for it."""
        if isinstance(msg, AudioChunk | EndOfStream) and self.pub is not None:
            self.pub.send(msg)
            self.counters["published"] += 1
        return ()

    def stop(self) -> None:
        """Close the socket and its context."""
        if self.pub is not None:
            self.pub.close()
            self.pub = None
        if self.ctx is not None:
            stop_authenticator(self.ctx)  # a CURVE bind's handler thread would block the exit
            self.ctx.term()
            self.ctx = None
