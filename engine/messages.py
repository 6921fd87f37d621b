"""Typed messages of the engine and the one codec that puts them on a ZeroMQ socket.

A message travels as multipart frames ``[topic, header, payload...]``: the header is msgpack
(version, kind, stream, seq, media time, trail, array descriptors, scalar fields) and each payload
frame is the raw buffer of one numpy array. Nothing is ever pickled; a malformed or oversized
message raises :class:`MessageError`, which the transport counts and skips.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

CODEC_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAY_BYTES = 64 * 1024 * 1024  # one 4K RGB frame is 25 MB: the largest legitimate array
MAX_ARRAYS = 64
MAX_TOPIC_BYTES = 256
ALLOWED_DTYPES = frozenset(
    {"bool", "uint8", "int16", "int32", "int64", "float32", "float64", "complex64"}
)

Trail = list[tuple[str, float, float]]


class MessageError(ValueError):
    """A message that cannot be decoded or encoded: malformed, oversized or of a bad dtype."""


@dataclass(kw_only=True)
class Message:
    """Base of every message: a stream id, a per-stream sequence number and the timing trail.

    ``trail`` holds one ``(node, t_in, t_out)`` per node the data went through, in
    ``time.monotonic()`` seconds (one clock for every process of a host). ``seq`` -1 means
    "number it on send" (per kind and stream); a pass-through node keeps the incoming number so
    that a gap stays visible downstream. ``gap`` is set by the
    receiving transport: how many messages of this stream were lost just before this one.
    """

    stream: str
    seq: int = -1
    trail: Trail = field(default_factory=list)
    gap: int = 0

    kind: ClassVar[str] = "message"
    time_field: ClassVar[str | None] = None  # the field that holds the media time
    array_fields: ClassVar[tuple[str, ...]] = ()
    array_dict_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def media_time(self) -> int:
        """Sample index or pts in ns, whichever this kind carries (-1 when it has none)."""
        return int(getattr(self, self.time_field)) if self.time_field else -1


# ----------------------------------------------------------------------------- data messages
@dataclass(kw_only=True)
class AudioChunk(Message):
    """Mono audio ``samples`` float32 (n,); its first sample is sample ``sample_index``."""

    sample_index: int
    samples: np.ndarray
    sample_rate: int = 11025

    kind: ClassVar[str] = "audio"
    time_field: ClassVar[str | None] = "sample_index"
    array_fields: ClassVar[tuple[str, ...]] = ("samples",)


@dataclass(kw_only=True)
class SpecFrames(Message):
    """STFT columns ``spec`` complex64 (n_bins, t); column 0 is frame ``frame_index``."""

    frame_index: int
    spec: np.ndarray

    kind: ClassVar[str] = "spec"
    time_field: ClassVar[str | None] = "frame_index"
    array_fields: ClassVar[tuple[str, ...]] = ("spec",)


@dataclass(kw_only=True)
class Masks(Message):
    """Per-label masks ``masks`` float32 (S, n_bins, t) for frames ``frame_index`` .. + t.

    ``mixture`` complex64 (n_bins, t) is the mixture STFT the masks apply to: it rides along so
    that overlap-add needs no join of two inputs. ``labels[s]`` names output stream s.
    """

    frame_index: int
    labels: list[str]
    masks: np.ndarray
    mixture: np.ndarray

    kind: ClassVar[str] = "masks"
    time_field: ClassVar[str | None] = "frame_index"
    array_fields: ClassVar[tuple[str, ...]] = ("masks", "mixture")


@dataclass(kw_only=True)
class VideoFrame(Message):
    """One RGB uint8 image (H, W, 3) at ``pts_ns`` of the stream's clock."""

    pts_ns: int
    image: np.ndarray

    kind: ClassVar[str] = "video"
    time_field: ClassVar[str | None] = "pts_ns"
    array_fields: ClassVar[tuple[str, ...]] = ("image",)


@dataclass(kw_only=True)
class VisionUpdate(Message):
    """A "latest value" result of a vision node at ``pts_ns``.

    ``labels[i]`` / ``track_ids[i]`` / ``boxes[i]`` (float32 (N, 4), x0 y0 x1 y1 in pixels)
    describe object i; ``arrays`` carries anything else by name (features (N, D), scores, ...).
    """

    pts_ns: int
    labels: list[str] = field(default_factory=list)
    track_ids: list[int] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "vision"
    time_field: ClassVar[str | None] = "pts_ns"
    array_fields: ClassVar[tuple[str, ...]] = ("boxes",)
    array_dict_fields: ClassVar[tuple[str, ...]] = ("arrays",)


# -------------------------------------------------------------------------- control messages
ALL_STREAMS = "*"


@dataclass(kw_only=True)
class EndOfStream(Message):
    """Stream ``stream`` has ended (``reason``: "eof", "device stopped", "gone", ...).

    ``time`` is the media time of the end (for audio: the stream's length in samples), -1 when
    unknown. ``stream == ALL_STREAMS`` is sent by the runtime on every output edge when a node
    finishes: the edge will carry nothing more.
    """

    reason: str = "eof"
    time: int = -1

    kind: ClassVar[str] = "eos"
    time_field: ClassVar[str | None] = "time"


@dataclass(kw_only=True)
class Heartbeat(Message):
    """A liveness tick with no data; nodes may ignore it."""

    time: int = -1

    kind: ClassVar[str] = "heartbeat"
    time_field: ClassVar[str | None] = "time"


MESSAGE_KINDS: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (AudioChunk, SpecFrames, Masks, VideoFrame, VisionUpdate, EndOfStream, Heartbeat)
}
_BASE_FIELDS = ("stream", "seq", "trail", "gap")


# --------------------------------------------------------------------------------- the codec
def _check_array(name: str, arr: Any) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise MessageError(f"field {name!r} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype.name not in ALLOWED_DTYPES:
        raise MessageError(
            f"field {name!r} has dtype {arr.dtype.name}; allowed: {sorted(ALLOWED_DTYPES)}"
        )
    if arr.nbytes > MAX_ARRAY_BYTES:
        raise MessageError(
            f"field {name!r} is {arr.nbytes} bytes > MAX_ARRAY_BYTES {MAX_ARRAY_BYTES}"
        )
    return np.ascontiguousarray(arr)


def _bytes_view(arr: np.ndarray) -> memoryview:
    # A flat uint8 view: memoryview.cast refuses empty and some non-native formats.
    return memoryview(arr.reshape(-1).view(np.uint8))


def encode(msg: Message, topic: bytes | None = None) -> list[bytes | memoryview]:
    """Encode ``msg`` as ``[topic, header, payload...]`` (payloads are zero-copy views).

    ``topic`` defaults to ``b"<kind>/<stream>"`` so that subscribers can filter by prefix.
    """
    cls = type(msg)
    if MESSAGE_KINDS.get(cls.kind) is not cls:
        raise MessageError(f"unknown message class {cls.__name__}; allowed: {list(MESSAGE_KINDS)}")
    arrays: list[dict[str, Any]] = []
    payload: list[memoryview] = []
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        if f.name in _BASE_FIELDS:
            continue
        value = getattr(msg, f.name)
        if f.name in cls.array_fields:
            arr = _check_array(f.name, value)
            arrays.append({"field": f.name, "dtype": arr.dtype.name, "shape": list(arr.shape)})
            payload.append(_bytes_view(arr))
        elif f.name in cls.array_dict_fields:
            for key, item in value.items():
                arr = _check_array(f"{f.name}[{key!r}]", item)
                arrays.append(
                    {"field": f.name, "key": str(key), "dtype": arr.dtype.name,
                     "shape": list(arr.shape)}
                )
                payload.append(_bytes_view(arr))
        else:
            fields[f.name] = value
    if len(arrays) > MAX_ARRAYS:
        raise MessageError(f"{len(arrays)} arrays > MAX_ARRAYS {MAX_ARRAYS}")
    header = {
        "v": CODEC_VERSION,
        "kind": cls.kind,
        "stream": msg.stream,
        "seq": int(msg.seq),
        "t": msg.media_time,
        "trail": [[str(n), float(a), float(b)] for n, a, b in msg.trail],
        "arrays": arrays,
        "fields": fields,
    }
    try:
        head = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"{cls.kind} message has a field msgpack cannot encode: {exc}") from exc
    if len(head) > MAX_HEADER_BYTES:
        raise MessageError(f"header is {len(head)} bytes > MAX_HEADER_BYTES {MAX_HEADER_BYTES}")
    if topic is None:
        topic = f"{cls.kind}/{msg.stream}".encode()
    return [topic, head, *payload]


def _buffer(frame: Any) -> memoryview:
    """Bytes of one received frame, without a copy (zmq.Frame, bytes or memoryview)."""
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")


def decode(frames: list[Any]) -> Message:
    """Decode ``[topic, header, payload...]`` into its message; raise MessageError when invalid.

    Arrays are read-only views of the received buffers: copy one before writing into it.
    """
    if len(frames) < 2:
        raise MessageError(f"a message has at least 2 frames (topic, header), got {len(frames)}")
    if len(_buffer(frames[0])) > MAX_TOPIC_BYTES:
        raise MessageError(f"topic longer than MAX_TOPIC_BYTES {MAX_TOPIC_BYTES}")
    head = _buffer(frames[1])
    if len(head) > MAX_HEADER_BYTES:
        raise MessageError(f"header is {len(head)} bytes > MAX_HEADER_BYTES {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MessageError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise MessageError(f"header must be a map, got {type(header).__name__}")
    if header.get("v") != CODEC_VERSION:
        raise MessageError(f"codec version {header.get('v')!r}; this engine reads {CODEC_VERSION}")
    cls = MESSAGE_KINDS.get(header.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise MessageError(f"unknown kind {header.get('kind')!r}; allowed: {list(MESSAGE_KINDS)}")
    descs = header.get("arrays")
    fields = header.get("fields")
    trail = header.get("trail")
    if not isinstance(descs, list) or not isinstance(fields, dict) or not isinstance(trail, list):
        raise MessageError(f"{cls.kind} header lacks arrays/fields/trail of the right types")
    if len(descs) > MAX_ARRAYS or len(descs) != len(frames) - 2:
        raise MessageError(
            f"{cls.kind} header describes {len(descs)} arrays but {len(frames) - 2} payload "
            f"frames came (max {MAX_ARRAYS})"
        )
    kwargs: dict[str, Any] = {k: v for k, v in fields.items() if isinstance(k, str)}
    for name in cls.array_dict_fields:
        kwargs[name] = {}
    for desc, frame in zip(descs, frames[2:], strict=True):
        if not isinstance(desc, dict):
            raise MessageError(f"array descriptor must be a map, got {desc!r}")
        name, dtype, shape = desc.get("field"), desc.get("dtype"), desc.get("shape")
        if dtype not in ALLOWED_DTYPES:
            raise MessageError(
                f"array dtype {dtype!r} not allowed; allowed: {sorted(ALLOWED_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise MessageError(f"array shape {shape!r} must be a list of non-negative ints")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes > MAX_ARRAY_BYTES:
            raise MessageError(f"array of {nbytes} bytes > MAX_ARRAY_BYTES {MAX_ARRAY_BYTES}")
        buf = _buffer(frame)
        if len(buf) != nbytes:
            raise MessageError(
                f"array {name!r} {dtype}{shape} needs {nbytes} bytes, payload has {len(buf)}"
            )
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        if name in cls.array_fields:
            kwargs[name] = arr
        elif name in cls.array_dict_fields and isinstance(desc.get("key"), str):
            kwargs[name][desc["key"]] = arr
        else:
            raise MessageError(f"{cls.kind} has no array field {name!r}")
    try:
        msg = cls(
            stream=str(header.get("stream")),
            seq=int(header.get("seq", 0)),
            trail=[(str(n), float(a), float(b)) for n, a, b in trail],
            **kwargs,
        )
    except (TypeError, ValueError) as exc:
        raise MessageError(f"{cls.kind} header fields do not fit the message: {exc}") from exc
    return msg
