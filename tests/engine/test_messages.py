"""Codec: every message kind round-trips; malformed, oversized and wrong-dtype input is refused."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from engine import messages as M
from engine.messages import MessageError, decode, encode
from engine.transport import Receiver

ROOT = Path(__file__).resolve().parents[2]
rng = np.random.default_rng(0)

EXAMPLES = [
    M.AudioChunk(stream="mic", seq=3, sample_index=2048,
                 samples=rng.standard_normal(1024).astype(np.float32)),
    M.SpecFrames(stream="mic", seq=1, frame_index=8,
                 spec=(rng.standard_normal((512, 4)) + 1j).astype(np.complex64)),
    M.Masks(stream="mic", seq=0, frame_index=4, labels=["violin#1", "flute#2"],
            masks=rng.random((2, 512, 4), dtype=np.float32),
            mixture=np.ones((512, 4), np.complex64)),
    M.VideoFrame(stream="cam", seq=9, pts_ns=10**9, image=np.zeros((48, 64, 3), np.uint8)),
    M.VisionUpdate(stream="cam", seq=2, pts_ns=5, labels=["violin"], track_ids=[1],
                   boxes=np.array([[1, 2, 3, 4]], np.float32),
                   arrays={"features": np.ones((1, 8), np.float32),
                           "valid": np.ones(1, bool)}, info={"model": "tiny"}),
    M.VisionUpdate(stream="cam", seq=3, pts_ns=6),  # no objects: empty arrays travel too
    M.EndOfStream(stream="mic", seq=4, reason="device stopped", time=4096),
    M.Heartbeat(stream="x", seq=0, time=7),
]


def _same(a, b) -> None:
    assert type(a) is type(b)
    for f in a.__dataclass_fields__:
        va, vb = getattr(a, f), getattr(b, f)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.shape == vb.shape and np.array_equal(va, vb), f
        elif isinstance(va, dict) and va and isinstance(next(iter(va.values())), np.ndarray):
            assert va.keys() == vb.keys()
            for k in va:
                assert np.array_equal(va[k], vb[k]) and va[k].dtype == vb[k].dtype
        else:
            assert va == vb, f


def test_every_kind_is_covered():
    assert {type(m) for m in EXAMPLES} == set(M.MESSAGE_KINDS.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.kind)
def test_roundtrip(msg):
    msg.trail = [("source", 1.0, 1.5), ("stft", 2.0, 2.25)]
    frames = encode(msg)
    assert frames[0] == f"{msg.kind}/{msg.stream}".encode()
    header = msgpack.unpackb(frames[1])
    assert header["v"] == M.CODEC_VERSION and header["kind"] == msg.kind
    assert header["t"] == msg.media_time and header["seq"] == msg.seq
    _same(msg, decode([bytes(f) for f in frames]))


def _valid_frames():
    return [bytes(f) for f in encode(EXAMPLES[0])]


def _with_header(**changes):
    frames = _valid_frames()
    header = msgpack.unpackb(frames[1])
    header.update(changes)
    frames[1] = msgpack.packb(header)
    return frames


@pytest.mark.parametrize("frames, why", [
    ([b"t"], "at least 2 frames"),
    ([b"t", b"\xc1\xc1garbage"], "not valid msgpack"),
    ([b"t", msgpack.packb([1, 2])], "must be a map"),
    (_with_header(v=99), "codec version"),
    (_with_header(kind="pickle"), "unknown kind"),
    (_valid_frames()[:2], "payload"),
    (_valid_frames() + [b"extra"], "payload"),
    (_valid_frames()[:2] + [_valid_frames()[2][:-4]], "needs 4096 bytes"),
    (_with_header(arrays=[{"field": "samples", "dtype": "object", "shape": [1024]}]), "dtype"),
    (_with_header(arrays=[{"field": "samples", "dtype": "float32", "shape": [-1]}]), "shape"),
    (_with_header(arrays=[{"field": "samples", "dtype": "float32", "shape": [2**40]}]),
     "MAX_ARRAY_BYTES"),
    (_with_header(arrays=[{"field": "nope", "dtype": "float32", "shape": [1024]}]), "no array"),
    (_with_header(fields={"sample_index": 0, "stream": "dup"}), "do not fit"),
    ([b"t", b"\x80" + b" " * (M.MAX_HEADER_BYTES + 1)], "MAX_HEADER_BYTES"),
])
def test_malformed_rejected(frames, why):
    with pytest.raises(MessageError, match=why):
        decode(frames)


def test_encode_rejects_bad_dtype_and_size(monkeypatch):
    with pytest.raises(MessageError, match="float16"):
        encode(M.AudioChunk(stream="a", sample_index=0, samples=np.zeros(4, np.float16)))
    with pytest.raises(MessageError, match="object"):
        encode(M.AudioChunk(stream="a", sample_index=0, samples=np.array([None])))
    monkeypatch.setattr(M, "MAX_ARRAY_BYTES", 100)
    with pytest.raises(MessageError, match="MAX_ARRAY_BYTES"):
        encode(M.AudioChunk(stream="a", sample_index=0, samples=np.zeros(100, np.float32)))
    monkeypatch.setattr(M, "MAX_HEADER_BYTES", 10)
    with pytest.raises(MessageError, match="MAX_HEADER_BYTES"):
        encode(M.EndOfStream(stream="a"))


def test_receiver_counts_and_skips_malformed(free_tcp_endpoint):
    ctx = zmq.Context()
    rx = Receiver(ctx, "pull", [free_tcp_endpoint], bind_endpoint=True)
    raw = ctx.socket(zmq.PUSH)
    raw.linger = 0
    raw.connect(free_tcp_endpoint)
    try:
        raw.send_multipart([b"audio/x", b"not msgpack \xc1"])
        raw.send_multipart(_valid_frames()[:2])  # payload missing
        raw.send_multipart(encode(M.EndOfStream(stream="x")))  # one socket: order kept
        got = []
        for _ in range(50):
            got += rx.recv(100)
            if got:
                break
        assert [m.kind for m in got] == ["eos"]
        assert rx.stats["errors"] == 2 and rx.stats["received"] == 1
        assert rx.last_error
    finally:
        rx.close()
        raw.close()
        ctx.term()


def test_no_pickle_anywhere():
    """The engine and the nodes never pickle (nor torch.load without weights_only)."""
    bad = re.compile(r"\bimport pickle\b|\bfrom pickle\b|cPickle|dill|allow_pickle\s*=\s*True"
                     r"|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    hits = []
    for pkg in ("engine", "nodes"):
        for path in (ROOT / pkg).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if bad.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits
