"""The Node base class and the loop that serves one node on its sockets.

A node declares its ports and handles one message per call; sockets, polling, sequence numbers,
timing trails, counters and shutdown live here, never in a node::

    class Gain(Node):
        inputs = {"audio": "pull"}
        outputs = {"audio": "push"}

        def __init__(self, *, gain: float = 1.0) -> None:
            super().__init__()
            self.gain = gain  # __init__ only stores configuration; open resources in start()

        def handle(self, port, msg):
            if isinstance(msg, AudioChunk):
                yield "audio", replace(msg, samples=msg.samples * self.gain, seq=-1, trail=[])
            else:
                yield "audio", msg  # control messages pass through

Port patterns: inputs "pull" (ordered, lossless) or "sub" (latest value); outputs "push" or
"pub" (see engine.transport). A source sets ``tick_interval`` (seconds; 0 = as fast as the
outputs accept) and implements ``tick()``; it sets ``self.exhausted = True`` when it has nothing
more. A node finishes when it is exhausted or when every "pull" input has received the final
``EndOfStream(ALL_STREAMS)`` from each upstream edge; then ``finish()`` may flush, the runtime
sends ``EndOfStream(ALL_STREAMS)`` on every output edge, and ``stop()`` releases resources.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import zmq

from engine.messages import ALL_STREAMS, EndOfStream, Message
from engine.transport import (
    FINISH_LINGER_MS,
    CurveKeys,
    Receiver,
    Sender,
    stop_authenticator,
)

Outputs = Iterable[tuple[str, Message]]
MAX_TRAILS = 50_000  # trails a sink keeps for the profiler (about 5 minutes of 1024-sample chunks)


class Node:
    """Base class of every node: override the ports, ``handle`` and the hooks you need."""

    inputs: ClassVar[dict[str, str]] = {}
    outputs: ClassVar[dict[str, str]] = {}
    tick_interval: ClassVar[float | None] = None

    def __init__(self) -> None:
        self.name: str = type(self).__name__
        self.counters: Counter[str] = Counter()
        self.exhausted = False
        self.clock: Callable[[], float] = time.monotonic

    def start(self) -> None:
        """Open devices, files, models (called once in the node's own process)."""

    def stop(self) -> None:
        """Release what start() opened; called on every exit path, also after an error."""

    def handle(self, port: str, msg: Message) -> Outputs:
        """Handle one message from input ``port``; yield ``(output_port, message)`` pairs."""
        return ()

    def tick(self) -> Outputs:
        """Sources: produce what is due now (called every ``tick_interval`` seconds)."""
        return ()

    def finish(self) -> Outputs:
        """All inputs ended (or the source is exhausted): yield the last outputs."""
        return ()


def put_until_halted(q: queue.Queue, item: Any, halt: threading.Event) -> bool:
    """Put `item` on a bounded queue from a source's reader thread, waiting while it is full
    but giving up (False) once `halt` is set, so that stop() never waits on a full queue."""
    while not halt.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def stamp(out: Message, trail: list, node: str, t_in: float, t_out: float) -> Message:
    """Give ``out`` the trail of the input it came from plus this node's (t_in, t_out)."""
    if out.trail is trail or not out.trail:  # a fresh message, or the input passed through
        out.trail = [*trail, (node, t_in, t_out)]
    return out


@dataclass
class PortWiring:
    """How one socket of a node is wired (made by engine.graph, read by the worker)."""

    pattern: str
    endpoints: list[str]
    bind: bool
    hwm: int | None = None
    n_upstream: int = 1  # "pull" inputs: how many edges must end before the port has ended


@dataclass
class Wiring:
    """All sockets of one node plus where it writes its statistics."""

    inputs: dict[str, PortWiring] = field(default_factory=dict)
    outputs: dict[str, list[PortWiring]] = field(default_factory=dict)
    curve: CurveKeys | None = None
    stats_path: str | None = None


class Runner:
    """Serves one node: poll inputs, call handle/tick, stamp and send outputs, count."""

    def __init__(self, node: Node, wiring: Wiring, ctx: zmq.Context | None = None) -> None:
        for port in wiring.inputs:
            if port not in node.inputs:
                raise ValueError(f"{node.name} has no input {port!r}; inputs: {list(node.inputs)}")
        for port in wiring.outputs:
            if port not in node.outputs:
                raise ValueError(
                    f"{node.name} has no output {port!r}; outputs: {list(node.outputs)}"
                )
        self.node = node
        self.wiring = wiring
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.stopping = False
        self.finished = False
        self.trails: list[list] = []
        self.receivers: dict[str, Receiver] = {}
        self.senders: dict[str, list[Sender]] = {}

    def request_stop(self, *_: Any) -> None:
        """Signal-safe: the loop ends at its next turn (at most ~0.1 s)."""
        self.stopping = True

    def _open(self) -> None:
        w = self.wiring
        for port, p in w.inputs.items():
            self.receivers[port] = Receiver(
                self.ctx, p.pattern, p.endpoints, bind_endpoint=p.bind, hwm=p.hwm, curve=w.curve
            )
        for port, edges in w.outputs.items():
            self.senders[port] = [
                Sender(self.ctx, p.pattern, p.endpoints, bind_endpoint=p.bind, hwm=p.hwm,
                       curve=w.curve)
                for p in edges
            ]

    def _emit(self, outs: Outputs | None, trail: list, t_in: float) -> None:
        for port, out in outs or ():
            senders = self.senders.get(port)
            if senders is None:
                if port not in self.node.outputs:
                    raise ValueError(
                        f"{self.node.name} emitted on {port!r}; outputs: {list(self.node.outputs)}"
                    )
                continue  # a declared but unconnected output
            stamp(out, trail, self.node.name, t_in, self.node.clock())
            for s in senders:
                s.send(out, stopping=lambda: self.stopping)
            self.node.counters["out"] += 1

    def serve(self, parent_pid: int | None = None) -> bool:
        """Run until finished or stopped; return True when the node finished its inputs."""
        node = self.node
        self._open()
        # Senders (node names) whose final EndOfStream(ALL) each "pull" port has seen: a set, so
        # that a repeated end (the launcher's stand-in after a restart) is harmless.
        pull_ended: dict[str, set[str]] = {
            p: set() for p, w in self.wiring.inputs.items() if w.pattern == "pull"
        }
        poller = zmq.Poller()
        for r in self.receivers.values():
            poller.register(r.sock, zmq.POLLIN)
        next_tick = node.clock()
        try:
            node.start()
            while not self.stopping:
                if node.tick_interval is None:
                    timeout_ms = 100
                else:
                    timeout_ms = max(0, min(100, int((next_tick - node.clock()) * 1000)))
                ready = dict(poller.poll(timeout_ms)) if self.receivers else {}
                if not self.receivers and timeout_ms:
                    time.sleep(timeout_ms / 1000)
                for port, r in self.receivers.items():
                    if r.sock not in ready:
                        continue
                    for msg in r.recv(0):
                        self._dispatch(port, msg, pull_ended)
                if node.tick_interval is not None and node.clock() >= next_tick:
                    t0 = node.clock()
                    self._emit(node.tick(), [], t0)
                    next_tick = max(next_tick + node.tick_interval, t0)
                # Finish only once nothing is pending: data may sit behind an end that came
                # through another pipe of the same port.
                pending = any(self.receivers[p].sock in ready for p in pull_ended)
                ended = bool(pull_ended) and not pending and all(
                    len(s) >= self.wiring.inputs[p].n_upstream for p, s in pull_ended.items()
                )
                if node.exhausted or ended:
                    self.finished = True
                    break
                if parent_pid is not None and os.getppid() != parent_pid:
                    break  # the launcher died: never outlive it
            if self.finished:
                self._emit(node.finish(), [], node.clock())
                for port in self.senders:
                    self._emit([(port, EndOfStream(stream=ALL_STREAMS, reason="finished"))],
                               [], node.clock())
        finally:
            try:
                node.stop()
            finally:
                self._close()
        return self.finished

    def _dispatch(self, port: str, msg: Message, pull_ended: dict[str, set[str]]) -> None:
        node = self.node
        t_in = node.clock()
        node.counters["in"] += 1
        if isinstance(msg, EndOfStream) and msg.stream == ALL_STREAMS:
            if port in pull_ended:
                sender = msg.trail[-1][0] if msg.trail else f"?{len(pull_ended[port])}"
                pull_ended[port].add(sender)
            return
        trail = msg.trail
        self._emit(node.handle(port, msg), trail, t_in)
        if not self.senders and not isinstance(msg, EndOfStream) and len(self.trails) < MAX_TRAILS:
            self.trails.append([*trail, (node.name, t_in, node.clock())])

    def _close(self) -> None:
        for r in self.receivers.values():
            r.close()
        for senders in self.senders.values():
            for s in senders:
                # A finished node's last messages must reach a consumer that may still be
                # starting; a stopped one gives them a short grace only.
                s.close(FINISH_LINGER_MS if self.finished else None)
        if self._own_ctx:
            stop_authenticator(self.ctx)  # only accepts new connections: none are needed now
            self.ctx.term()  # returns once queued messages are delivered or their linger ends
        if self.wiring.stats_path:
            tmp = self.wiring.stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.stats(), f)
            os.replace(tmp, self.wiring.stats_path)

    def stats(self) -> dict[str, Any]:
        """Counters of the node and of each socket, plus the trails a sink collected."""
        return {
            "node": self.node.name,
            "finished": self.finished,
            "counters": dict(self.node.counters),
            "inputs": {p: r.stats for p, r in self.receivers.items()},
            "outputs": {p: [s.stats for s in ss] for p, ss in self.senders.items()},
            "trails": self.trails,
        }


def install_signal_handlers(runner: Runner) -> None:
    """SIGTERM and SIGINT (Ctrl-C reaches the whole process group) end the loop cleanly."""
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
