"""CameraSource: video of any FFmpeg input (a v4l2 camera, a tcp/udp/rtsp stream, a file, a FIFO)
as RGB uint8 VideoFrames resampled to a fixed frame rate.

Decoding runs in a background thread (a network read may block; the node loop must stay
responsive to stop). Frames keep their media time: ``pts_ns`` is the frame's presentation time
relative to the first decoded frame, so a file's video lines up with its audio (both start at 0)
and a live stream starts at 0 too. Every way the input can end (end of file, a camera unplugged,
a stream that stops sending for ``read_timeout_s``, an input that cannot be opened) becomes an
``EndOfStream`` with the reason, never a hang and never a crash loop.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from engine.messages import EndOfStream, VideoFrame
from engine.node import Node, Outputs, put_until_halted

_QUEUE_ITEMS = 64  # decoded frames buffered ahead of the node loop (8 s at 8 fps)
MAX_BAD_PACKETS = 250  # undecodable packets in a row before the input counts as gone
LIVE_SCHEMES = ("tcp://", "udp://", "rtsp://", "rtp://", "srt://", "http://", "https://")


def resolve_input(url: str) -> tuple[str, str | None]:
    """(FFmpeg url, forced format): "camera" means /dev/video0, /dev/videoN is read with v4l2."""
    if url == "camera":
        url = "/dev/video0"
    if url.startswith("/dev/video"):
        return url, "v4l2"
    return url, None


def is_live(url: str) -> bool:
    """True for cameras and network streams (their clock is the wall clock)."""
    return url == "camera" or url.startswith("/dev/video") or url.startswith(LIVE_SCHEMES)


class CameraSource(Node):
    """VideoFrames (H, W, 3) uint8 at ``fps`` on "video" (ordered, lossless: push).

    ``size`` = (width, height) rescales; ``format`` forces the FFmpeg demuxer ("mpegts",
    "v4l2", ...); ``options`` are FFmpeg options of the input (e.g. {"video_size": "640x480"}).
    ``realtime`` paces a file at its frame rate (live inputs are paced by their source).
    """

    inputs: dict[str, str] = {}
    outputs = {"video": "push"}
    tick_interval = 0.005

    def __init__(self, *, url: str, fps: float = 8.0, size: list[int] | None = None,
                 stream: str = "video", format: str | None = None,
                 options: dict[str, str] | None = None, realtime: bool = False,
                 open_timeout_s: float = 10.0, read_timeout_s: float = 5.0) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if size is not None and (len(size) != 2 or min(size) < 2):
            raise ValueError(f"size must be [width, height] >= 2 pixels, got {size}")
        self.url, forced = resolve_input(url)
        self.format = format or forced
        self.fps, self.size, self.stream = float(fps), size, stream
        self.options = dict(options or {})
        self.realtime = realtime
        self.open_timeout_s, self.read_timeout_s = open_timeout_s, read_timeout_s
        self._q: queue.Queue = queue.Queue(maxsize=_QUEUE_ITEMS)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: tuple | None = None
        self._t0: float | None = None

    def start(self) -> None:
        """Start the decoding thread (the input is opened there: opening may block)."""
        self._thread = threading.Thread(target=self._decode, name="video-decode", daemon=True)
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        return put_until_halted(self._q, item, self._halt)

    def _decode(self) -> None:
        import av

        container = None
        try:
            try:
                container = av.open(self.url, mode="r", format=self.format, options=self.options,
                                    timeout=(self.open_timeout_s, self.read_timeout_s))
            except Exception as exc:  # any FFmpeg or OS error: the input is unavailable
                self._put(("end", f"cannot open {self.url!r}: {exc}"))
                return
            if not container.streams.video:
                kinds = [s.type for s in container.streams]
                self._put(("end", f"{self.url!r} has no video stream (streams: {kinds})"))
                return
            step_ns = int(round(1e9 / self.fps))
            first: float | None = None
            next_ns = 0
            wall0 = time.monotonic()
            for frame in self._frames(container):
                if self._halt.is_set():
                    return
                # Some live inputs carry no timestamps: their clock is the wall clock.
                t = frame.time if frame.time is not None else time.monotonic() - wall0
                if first is None:
                    first = t
                pts_ns = int(round((t - first) * 1e9))
                if pts_ns < next_ns:
                    continue  # resampling to fps: drop frames between two output instants
                next_ns = max(next_ns + step_ns, pts_ns)
                if self.size:
                    frame = frame.reformat(width=self.size[0], height=self.size[1])
                if not self._put(("video", pts_ns, frame.to_ndarray(format="rgb24"))):
                    return
            self._put(("end", "eof"))
        except Exception as exc:  # a camera unplugged, a stream that stopped: the input is gone
            self._put(("end", f"input gone: {type(exc).__name__}: {exc}"))
        finally:
            if container is not None:
                container.close()

    def _frames(self, container: Any) -> Any:
        """Decoded frames; a packet that does not decode (a live stream joined between key
        frames, a corrupt packet) is skipped and counted, a demuxer error ends the input."""
        import av

        bad = 0
        for packet in container.demux(container.streams.video[0]):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                bad += 1
                self.counters["bad_packets"] += 1
                if bad > MAX_BAD_PACKETS:
                    raise
                continue
            bad = 0
            yield from frames

    def tick(self) -> Outputs:
        """Emit the frames that are decoded (and, when pacing a file, due)."""
        for _ in range(16):  # a bounded batch keeps the loop responsive to stop
            item = self._pending
            self._pending = None
            if item is None:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    return
            if item[0] == "end":
                if item[1] != "eof":
                    self.counters["input_lost"] += 1
                    print(f"[{self.name}] video ended: {item[1]}", flush=True)
                yield "video", EndOfStream(stream=self.stream, reason=item[1])
                self.exhausted = True
                return
            _, pts_ns, image = item
            if self.realtime:
                now = self.clock()
                if self._t0 is None:
                    self._t0 = now - pts_ns / 1e9
                if now < self._t0 + pts_ns / 1e9:
                    self._pending = item  # not due yet
                    return
            self.counters["frames"] += 1
            yield "video", VideoFrame(stream=self.stream, pts_ns=pts_ns, image=image)

    def stop(self) -> None:
        """Stop the decoding thread (it closes the input)."""
        self._halt.set()
        if self._thread is not None:
            # A read blocked in FFmpeg ends at its timeout; the thread is a daemon, so the
            # process need not wait for it (the launcher's grace before SIGKILL is 5 s).
            self._thread.join(timeout=2.0)
