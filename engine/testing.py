"""Test harness for nodes without sockets or processes, plus small nodes for runtime tests.

``run_node(node, inputs)`` drives a node the way the runtime does (start, handle each input,
tick a source until it is exhausted, finish, stop), bounded by a message count and with an
injectable clock; every message goes through the codec on the way in and out, so a node whose
messages cannot travel fails here already.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from engine.messages import AudioChunk, EndOfStream, Message, decode, encode
from engine.node import Node, Outputs, stamp


class ManualClock:
    """A clock for tests: ``clock()`` returns ``now``; ``advance(dt)`` moves it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        """Move the clock forward by ``dt`` seconds."""
        self.now += dt


def _roundtrip(msg: Message) -> Message:
    return decode(encode(msg))


def run_node(
    node: Node,
    inputs: Iterable[tuple[str, Message]] = (),
    *,
    max_messages: int = 100_000,
    max_ticks: int = 100_000,
    clock: Callable[[], float] | None = None,
    tick_advance: float | None = None,
    codec: bool = True,
) -> list[tuple[str, Message]]:
    """Run ``node`` on ``inputs``; return its ``(port, message)`` outputs in order.

    A source (``tick_interval`` not None) is ticked after the inputs until it is exhausted,
    ``max_ticks`` ticks or ``max_messages`` outputs. With a ManualClock, ``tick_advance``
    (default: the node's tick_interval) is added before each tick. ``finish()`` runs only when
    the node got to its end (inputs all given / source exhausted), as in the runtime.
    """
    if clock is not None:
        node.clock = clock
    outputs: list[tuple[str, Message]] = []

    def collect(outs: Outputs | None, trail: list, t_in: float) -> bool:
        for port, out in outs or ():
            if port not in node.outputs:
                raise ValueError(f"{node.name} emitted on {port!r}; outputs: {list(node.outputs)}")
            out = stamp(out, trail, node.name, t_in, node.clock())
            outputs.append((port, _roundtrip(out) if codec else out))
            if len(outputs) >= max_messages:
                return False
        return True

    node.start()
    try:
        going = True
        for port, msg in inputs:
            if port not in node.inputs:
                raise ValueError(f"{node.name} has no input {port!r}; inputs: {list(node.inputs)}")
            msg = _roundtrip(msg) if codec else msg
            t_in = node.clock()
            going = collect(node.handle(port, msg), msg.trail, t_in)
            if not going:
                break
        if going and node.tick_interval is not None:
            for _ in range(max_ticks):
                if node.exhausted:
                    break
                if isinstance(clock, ManualClock):
                    clock.advance(node.tick_interval if tick_advance is None else tick_advance)
                going = collect(node.tick(), [], node.clock())
                if not going:
                    break
        if going and (node.tick_interval is None or node.exhausted):
            collect(node.finish(), [], node.clock())
    finally:
        node.stop()
    return outputs


# ------------------------------------------------------------------ nodes for runtime tests
class PassThrough(Node):
    """Forwards every message unchanged (sequence numbers kept)."""

    inputs = {"in": "pull"}
    outputs = {"out": "push"}

    def handle(self, port: str, msg: Message) -> Outputs:
        """Any message -> the same message on "out"."""
        yield "out", msg


class CrashOnce(PassThrough):
    """A pass-through that kills its process at message ``at`` the first time it runs.

    ``marker`` is a file path that records the crash, so that the restarted process passes
    everything through: the supervisor's restart path under test.
    """

    def __init__(self, *, marker: str, at: int = 3) -> None:
        super().__init__()
        self.marker = marker
        self.at = at
        self.seen = 0

    def handle(self, port: str, msg: Message) -> Outputs:
        """Pass through; the ``at``-th message ends the process abruptly (first run only)."""
        self.seen += 1
        if self.seen == self.at and not Path(self.marker).exists():
            Path(self.marker).write_text("crashed")
            os._exit(3)  # no clean-up at all: what a segfault in a native library looks like
        yield "out", msg


class ArraySource(Node):
    """Plays a 1-D float32 ``.npy`` file as AudioChunks of ``block`` samples, then
    ``EndOfStream(stream, time=length)``: a file source for runtime tests that starts fast
    (nodes.sources:FileSource imports torch and PyAV)."""

    outputs = {"audio": "push"}
    tick_interval = 0.0

    def __init__(self, *, path: str, block: int = 1024, stream: str = "mix",
                 sample_rate: int = 11025) -> None:
        super().__init__()
        self.path, self.block, self.stream, self.sample_rate = path, block, stream, sample_rate
        self.pos = 0

    def start(self) -> None:
        """Load the samples."""
        self.samples = np.load(self.path)
        if self.samples.ndim != 1 or self.samples.dtype != np.float32:
            raise ValueError(f"{self.path}: need 1-D float32 samples, got "
                             f"{self.samples.dtype} {self.samples.shape}")

    def tick(self) -> Outputs:
        """The next block; after the last one the stream's end."""
        if self.pos < len(self.samples):
            chunk = self.samples[self.pos:self.pos + self.block]
            yield "audio", AudioChunk(stream=self.stream, sample_index=self.pos, samples=chunk,
                                      sample_rate=self.sample_rate)
            self.pos += len(chunk)
        else:
            yield "audio", EndOfStream(stream=self.stream, time=len(self.samples))
            self.exhausted = True
