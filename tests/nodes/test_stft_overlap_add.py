"""STFT and overlap-add nodes: streamed equals offline, identity masks reconstruct the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.messages import AudioChunk, EndOfStream, Masks, SpecFrames
from engine.testing import run_node
from models.spectral import HOP, istft, stft
from nodes.identity_separator import IdentitySeparator
from nodes.overlap_add import OverlapAdd
from nodes.stft import STFT

rng = np.random.default_rng(0)


def _chunks(x: np.ndarray, sizes: list[int], stream: str = "mix"):
    out, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        out.append(("audio", AudioChunk(stream=stream, sample_index=i, samples=x[i:i + n])))
        i, k = i + n, k + 1
    return out + [("audio", EndOfStream(stream=stream, time=len(x)))]


def _audio(outputs, stream: str) -> np.ndarray:
    chunks = [m for _, m in outputs if isinstance(m, AudioChunk) and m.stream == stream]
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.sample_index == a.sample_index + len(a.samples)  # contiguous, no overlap
    return np.concatenate([c.samples for c in chunks])


@pytest.mark.parametrize("sizes, block", [([1000], 4), ([1, 255, 7, 4096, 300], 3), ([256], 1)])
def test_streamed_stft_and_overlap_add_equal_offline(sizes, block):
    x = (0.5 * rng.standard_normal(7 * 1024 + 13)).astype(np.float32)
    spec_out = run_node(STFT(block=block), _chunks(x, sizes))
    frames = [m for _, m in spec_out if isinstance(m, SpecFrames)]
    assert all(f.spec.shape[1] <= block for f in frames)
    assert [f.frame_index for f in frames] == list(np.cumsum([0] + [f.spec.shape[1]
                                                                    for f in frames[:-1]]))
    streamed = np.concatenate([f.spec for f in frames], axis=1)
    offline = stft(torch.from_numpy(x)).numpy()
    assert streamed.shape == offline.shape == (512, 1 + len(x) // HOP)
    assert np.abs(streamed - offline).max() < 1e-4
    eos = spec_out[-1][1]
    assert isinstance(eos, EndOfStream) and eos.time == len(x)

    masks = run_node(IdentitySeparator(), spec_out)
    y = _audio(run_node(OverlapAdd(), masks), "mix")
    reference = istft(torch.from_numpy(offline), len(x)).numpy()
    assert y.shape == x.shape
    assert np.abs(y - reference).max() < 1e-5  # streamed == offline istft(stft(x))
    assert np.abs(y - x).max() < 1e-4  # identity masks reconstruct the input


def _masks_msgs(x: np.ndarray, labels_at):
    """Masks over the STFT of x, 4 frames each; labels_at(frame_index) -> {label: gain}."""
    spec = stft(torch.from_numpy(x)).numpy()
    msgs = []
    for f in range(0, spec.shape[1], 4):
        mix = spec[:, f:f + 4]
        gains = labels_at(f)
        msgs.append(("masks", Masks(
            stream="mix", frame_index=f, labels=list(gains),
            masks=np.stack([np.full(mix.shape, g, np.float32) for g in gains.values()]),
            mixture=np.ascontiguousarray(mix))))
    return msgs + [("masks", EndOfStream(stream="mix", time=len(x)))]


def test_labels_appear_and_fade_out():
    x = (0.5 * rng.standard_normal(40 * HOP)).astype(np.float32)
    out = run_node(OverlapAdd(), _masks_msgs(
        x, lambda f: {"a": 1.0, "b": 0.5} if 8 <= f < 24 else {"a": 1.0}))
    ends = {m.stream: m for _, m in out if isinstance(m, EndOfStream)}
    assert ends["b"].reason == "gone" and ends["a"].reason == "eof"
    a = _audio(out, "a")
    assert a.shape == x.shape and np.abs(a - x).max() < 1e-4
    b_chunks = [m for _, m in out if isinstance(m, AudioChunk) and m.stream == "b"]
    assert b_chunks[0].sample_index == 8 * HOP  # starts on the stream's clock
    b = _audio(out, "b")
    middle = slice(8 * HOP + 1024 - b_chunks[0].sample_index, 24 * HOP - 1024 - 8 * HOP)
    assert np.abs(b[middle] - 0.5 * x[8 * HOP + 1024:24 * HOP - 1024]).max() < 1e-4
    assert np.abs(b[-256:]).max() == 0.0  # faded out to silence before closing


def test_gaps_are_zero_filled_and_counted():
    x = (0.5 * rng.standard_normal(10 * 1000)).astype(np.float32)
    chunks = _chunks(x, [1000])
    del chunks[4]  # samples 4000..4999 lost upstream
    node = STFT(block=4)
    out = run_node(node, chunks)
    assert node.counters["gap_samples"] == 1000
    spec = np.concatenate([m.spec for _, m in out if isinstance(m, SpecFrames)], axis=1)
    x_gap = x.copy()
    x_gap[4000:5000] = 0
    assert np.abs(spec - stft(torch.from_numpy(x_gap)).numpy()).max() < 1e-4

    msgs = _masks_msgs(x, lambda f: {"a": 1.0})
    del msgs[3]  # frames 12..15 lost
    ola = OverlapAdd()
    y = _audio(run_node(ola, msgs), "a")
    assert ola.counters["gap_frames"] == 4 and y.shape == x.shape
    assert np.abs(y[:10 * HOP] - x[:10 * HOP]).max() < 1e-4


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sample_rate 44100"):
        run_node(STFT(), [("audio", AudioChunk(stream="s", sample_index=0, sample_rate=44100,
                                               samples=np.zeros(10, np.float32)))])
    with pytest.raises(ValueError, match="block"):
        STFT(block=0)
    bad = Masks(stream="s", frame_index=0, labels=["a"], masks=np.ones((1, 256, 4), np.float32),
                mixture=np.ones((512, 4), np.complex64))
    with pytest.raises(ValueError, match="expected"):
        run_node(OverlapAdd(), [("masks", bad)])
