"""ZeroMQ sockets with the engine's delivery policies, counters and bind rules.

Two patterns, stated once here:

* **Ordered, lossless** (PUSH -> PULL) for audio and everything derived from it. The receiving
  PULL binds, senders connect. A full queue (``hwm`` messages, default 1000) blocks the sender:
  back-pressure, never a silent drop. A send that cannot proceed while the node is stopping is
  dropped and counted. Sequence numbers are checked per (kind, stream) on receipt: a jump is
  counted as a gap and flagged on the message (``msg.gap``); a step back (a restarted sender)
  is counted as a reset.
* **Latest value wins** (PUB -> SUB) for vision updates. The publisher binds. ZMQ_CONFLATE does
  not support multipart messages, so the policy is "keep-last": a receive drains everything
  queued and returns only the newest message per (kind, stream), counting the superseded ones.
  The publisher's HWM is small (default 16): a slow subscriber loses old updates and never
  blocks the publisher.

Endpoints are ``ipc://``, ``inproc://`` or ``tcp://``. A tcp bind on a non-loopback address
requires CURVE keys (:class:`CurveKeys`) and is refused otherwise with :class:`InsecureBindError`.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from engine.messages import Message, MessageError, decode, encode

DEFAULT_PUSH_HWM = 1000
DEFAULT_PUB_HWM = 16
DEFAULT_PUSH_LINGER_MS = 2000  # lets the last messages leave when a node stops on a signal
FINISH_LINGER_MS = 60_000  # a finished node waits this long for a slow-starting consumer
SCHEMES = ("ipc", "inproc", "tcp")


class InsecureBindError(RuntimeError):
    """A non-loopback tcp bind was asked for without CURVE keys."""


def parse_endpoint(endpoint: str) -> tuple[str, str, str]:
    """Split ``scheme://address`` into (scheme, host, port); host and port are "" unless tcp."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(f"endpoint {endpoint!r} must be one of {[s + '://...' for s in SCHEMES]}")
    if scheme != "tcp":
        return scheme, "", ""
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"tcp endpoint {endpoint!r} must be tcp://host:port")
    return scheme, host.strip("[]"), port


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname or interface name: treat as exposed


@dataclass(frozen=True)
class CurveKeys:
    """CURVE key files made by ``zmq.auth.create_certificates``.

    ``server_secret`` / ``client_secret``: ``*.key_secret`` files of the binding and the
    connecting side; ``authorized_dir``: directory of the public ``*.key`` files of the clients
    a server accepts (default: the directory of ``client_secret``).
    """

    server_secret: str
    client_secret: str
    authorized_dir: str | None = None

    def server(self) -> tuple[bytes, bytes]:
        """(public, secret) of the server."""
        return _load_pair(self.server_secret)

    def server_public_file(self) -> str:
        """The server's public ``*.key`` file (all a client host needs of the server)."""
        path = Path(self.server_secret)
        public = path.with_suffix(".key")
        return str(public if public.is_file() else path)

    def client(self) -> tuple[bytes, bytes]:
        """(public, secret) of the client."""
        return _load_pair(self.client_secret)


def _load_pair(path: str) -> tuple[bytes, bytes]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"CURVE key file {path!r} does not exist")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"CURVE key file {path!r} holds no secret key (use the *.key_secret file)")
    return public, secret


_authenticators: dict[int, Any] = {}


def _start_authenticator(ctx: zmq.Context, keys: CurveKeys) -> None:
    """One ZAP handler per context: only clients whose public key is authorized may connect."""
    if id(ctx) in _authenticators:
        return
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(
        domain="*", location=keys.authorized_dir or str(Path(keys.client_secret).parent)
    )
    _authenticators[id(ctx)] = auth


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the ZAP handler that a CURVE bind started on ``ctx``, if any. Call it before
    ``ctx.term()``: the handler's thread would keep the process from exiting."""
    auth = _authenticators.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def bind(sock: zmq.Socket, endpoint: str, curve: CurveKeys | None = None) -> None:
    """Bind ``sock``; a tcp bind off loopback needs ``curve`` (else InsecureBindError)."""
    scheme, host, _ = parse_endpoint(endpoint)
    if scheme == "tcp" and not is_loopback(host):
        if curve is None:
            raise InsecureBindError(
                f"refusing to bind {endpoint!r}: a non-loopback bind needs CURVE keys "
                "(set [security] server_secret/client_secret in the graph) or bind 127.0.0.1"
            )
        _start_authenticator(sock.context, curve)
        public, secret = curve.server()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_server = True
    sock.bind(endpoint)


def connect(sock: zmq.Socket, endpoint: str, curve: CurveKeys | None = None) -> None:
    """Connect ``sock``; to a non-loopback tcp peer it speaks CURVE when ``curve`` is given."""
    scheme, host, _ = parse_endpoint(endpoint)
    if scheme == "tcp" and not is_loopback(host) and curve is not None:
        server_public, _ = zmq.auth.load_certificate(curve.server_public_file())
        public, secret = curve.client()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = server_public
    sock.connect(endpoint)


class _Counted:
    """Counters shared by the socket wrappers."""

    def __init__(self) -> None:
        self.stats: dict[str, int] = {
            "sent": 0, "received": 0, "errors": 0, "gaps": 0, "missing": 0, "resets": 0,
            "dropped": 0,
        }
        self.last_error: str = ""

    def _decode(self, frames: list[Any]) -> Message | None:
        try:
            msg = decode(frames)
        except MessageError as exc:
            self.stats["errors"] += 1
            self.last_error = str(exc)
            return None
        self.stats["received"] += 1
        return msg


class Sender(_Counted):
    """Output side of one edge: PUSH (ordered, blocking when full) or PUB (never blocks)."""

    def __init__(
        self,
        ctx: zmq.Context,
        pattern: str,
        endpoints: list[str],
        *,
        bind_endpoint: bool,
        hwm: int | None = None,
        linger_ms: int | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__()
        if pattern not in ("push", "pub"):
            raise ValueError(f"output pattern {pattern!r}; allowed: 'push', 'pub'")
        self.pattern = pattern
        self.sock = ctx.socket(zmq.PUSH if pattern == "push" else zmq.PUB)
        self.sock.sndhwm = hwm or (DEFAULT_PUSH_HWM if pattern == "push" else DEFAULT_PUB_HWM)
        default_linger = DEFAULT_PUSH_LINGER_MS if pattern == "push" else 0
        self.sock.linger = default_linger if linger_ms is None else linger_ms
        for ep in endpoints:
            (bind if bind_endpoint else connect)(self.sock, ep, curve)
        self._seq: dict[tuple[str, str], int] = {}

    def send(self, msg: Message, stopping: Callable[[], bool] | None = None) -> bool:
        """Send one message; PUSH waits while the queue is full unless ``stopping()`` turns true.

        Returns False (and counts a drop) when the message could not be sent.
        """
        if msg.seq < 0:  # numbered per (kind, stream) unless the node kept an incoming number
            key = (msg.kind, msg.stream)
            msg.seq = self._seq.get(key, 0)
            self._seq[key] = msg.seq + 1
        frames = encode(msg)
        while True:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.stats["sent"] += 1
                return True
            except zmq.Again:
                if self.pattern == "pub" or (stopping is not None and stopping()):
                    self.stats["dropped"] += 1
                    return False
                self.sock.poll(50, zmq.POLLOUT)

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket; queued PUSH messages may still leave for ``linger_ms`` (the
        context's term() waits for them)."""
        if linger_ms is not None:
            self.sock.linger = linger_ms
        self.sock.close()


class Receiver(_Counted):
    """Input side of one port: PULL (ordered, gap-checked) or SUB (keep-last per stream)."""

    def __init__(
        self,
        ctx: zmq.Context,
        pattern: str,
        endpoints: list[str],
        *,
        bind_endpoint: bool,
        hwm: int | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__()
        if pattern not in ("pull", "sub"):
            raise ValueError(f"input pattern {pattern!r}; allowed: 'pull', 'sub'")
        self.pattern = pattern
        self.sock = ctx.socket(zmq.PULL if pattern == "pull" else zmq.SUB)
        self.sock.rcvhwm = hwm or (DEFAULT_PUSH_HWM if pattern == "pull" else DEFAULT_PUB_HWM)
        self.sock.linger = 0
        if pattern == "sub":
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        for ep in endpoints:
            (bind if bind_endpoint else connect)(self.sock, ep, curve)
        self._next_seq: dict[tuple[str, str], int] = {}

    def _check_seq(self, msg: Message) -> None:
        key = (msg.kind, msg.stream)
        expected = self._next_seq.get(key)
        if expected is not None and msg.seq > expected:
            msg.gap = msg.seq - expected
            self.stats["gaps"] += 1
            self.stats["missing"] += msg.gap
        elif expected is not None and msg.seq < expected:
            self.stats["resets"] += 1
        self._next_seq[key] = msg.seq + 1

    def recv(self, timeout_ms: int = 0) -> list[Message]:
        """Messages available within ``timeout_ms``: at most one for PULL (order kept), the
        newest per (kind, stream) for SUB. Malformed messages are counted and skipped."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return []
        if self.pattern == "pull":
            msg = self._decode(self.sock.recv_multipart(copy=False))
            if msg is None:
                return []
            self._check_seq(msg)
            return [msg]
        latest: dict[tuple[str, str], Message] = {}
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            msg = self._decode(frames)
            if msg is None:
                continue
            key = (msg.kind, msg.stream)
            if key in latest:
                self.stats["dropped"] += 1
            latest[key] = msg
        return list(latest.values())

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True
