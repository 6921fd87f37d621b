"""Separator node: streamed masks equal the offline sliding-window reference, streamed separator +
overlap-add equals offline resynthesis, the query cache follows vision, no-instrument handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.messages import AudioChunk, EndOfStream, Masks, SpecFrames, VisionUpdate
from engine.testing import run_node
from models.spectral import istft, stft
from models.streaming import sliding_masks
from nodes.bundle import make_random_bundle
from nodes.overlap_add import OverlapAdd
from nodes.separator import Separator


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.getbasetemp() / "random_bundle"
    if not (path / "bundle.json").is_file():  # shared by the node test modules of a session
        make_random_bundle(path)
    return str(path)


def chunks(spec: torch.Tensor, seed: int = 0) -> list[tuple[str, SpecFrames]]:
    """The spectrogram as SpecFrames of random sizes (1..6 frames), as the STFT node may send."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < spec.shape[1]:
        n = int(rng.integers(1, 7))
        out.append(("spec", SpecFrames(stream="mix", frame_index=i,
                                       spec=spec[:, i:i + n].numpy().astype(np.complex64))))
        i += n
    return out


def signal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 11025
    return 0.3 * torch.sin(2 * np.pi * 440 * t) + 0.05 * torch.randn(n, generator=g)


def masks_of(outputs: list) -> np.ndarray:
    return np.concatenate([m.masks for _, m in outputs if isinstance(m, Masks)], axis=2)


@pytest.mark.parametrize("blend", [False, True])
def test_streamed_masks_equal_offline_reference(bundle: str, blend: bool) -> None:
    x = signal(11025 * 2 + 100)
    spec = stft(x)
    node = Separator(bundle=bundle, fallback=["violin", "flute"], lookahead=3, block=5,
                     device="cpu", blend=blend)  # as the reference below (test_cuda.py: the GPU)
    out = run_node(node, [*chunks(spec), ("spec", EndOfStream(stream="mix", time=len(x)))])
    assert isinstance(out[-1][1], EndOfStream) and out[-1][1].time == len(x)
    streamed = masks_of(out)
    assert streamed.shape == (2, 512, spec.shape[1])
    assert {tuple(m.labels) for _, m in out if isinstance(m, Masks)} == {("violin", "flute")}
    ref_node = Separator(bundle=bundle, fallback=["violin", "flute"], device="cpu")
    ref_node.start()
    cache = ref_node.fallback_state.cache
    with torch.no_grad():
        ref = sliding_masks(lambda v: ref_node.model.separate(v, cache), spec,
                            ref_node.model.n_rows, window=ref_node.window, block=5, lookahead=3,
                            blend=blend)
        other = sliding_masks(lambda v: ref_node.model.separate(v, cache), spec,
                              ref_node.model.n_rows, window=ref_node.window, block=5,
                              lookahead=3, blend=not blend)
    np.testing.assert_allclose(streamed, ref.numpy(), atol=1e-6)
    assert np.abs(streamed - other.numpy()).max() > 1e-4  # blending changes the masks
    assert node.counters["fallback_steps"] == node.counters["steps"] > 0


def test_streamed_separator_and_overlap_add_equal_offline(bundle: str) -> None:
    x = signal(11025 + 333, seed=1)
    spec = stft(x)
    sep = Separator(bundle=bundle, fallback=["piano"], device="cpu")
    masks = run_node(sep, [*chunks(spec, 3), ("spec", EndOfStream(stream="mix", time=len(x)))])
    audio = run_node(OverlapAdd(), masks)
    got = np.concatenate([m.samples for _, m in audio if isinstance(m, AudioChunk)])
    assert [m.stream for _, m in audio if isinstance(m, EndOfStream)] == ["piano"]
    # Offline: the reference masks on the whole spectrogram, applied and inverted at once.
    with torch.no_grad():
        ref_masks = sliding_masks(lambda v: sep.model.separate(v, sep.fallback_state.cache),
                                  spec, sep.model.n_rows, window=sep.window, block=sep.block,
                                  lookahead=sep.lookahead)
    offline = istft(ref_masks[0] * spec, len(x)).numpy()
    assert got.shape == offline.shape
    np.testing.assert_allclose(got, offline, atol=1e-5)


def vision(pts_s: float, labels: list[str], class_ids: list[int], obj_dim: int = 64,
           motion_dim: int = 64) -> VisionUpdate:
    n = len(labels)
    rng = np.random.default_rng(n)
    return VisionUpdate(stream="vision", pts_ns=int(pts_s * 1e9), labels=labels,
                        track_ids=list(range(1, n + 1)), boxes=np.zeros((n, 4), np.float32),
                        arrays={"class_ids": np.array(class_ids, np.int64),
                                "obj_feats": rng.standard_normal((n, obj_dim)).astype(np.float32),
                                "motion": rng.standard_normal((n, 4, motion_dim))
                                .astype(np.float32)})


def test_query_cache_follows_vision_and_no_instrument_is_reported(bundle: str, capsys) -> None:
    x = signal(11025 * 2)
    spec = stft(x)
    msgs = chunks(spec)
    half = len(msgs) // 2
    inputs = [("vision", vision(0.0, ["violin#1", "flute#1"], [11, 6])), *msgs[:half],
              ("vision", vision(1.0, [], [])), *msgs[half:],
              ("spec", EndOfStream(stream="mix", time=len(x)))]
    node = Separator(bundle=bundle)
    out = [m for _, m in run_node(node, inputs) if isinstance(m, Masks)]
    labels = [tuple(m.labels) for m in out]
    assert labels[0] == ("violin#1", "flute#1") and labels[-1] == ()
    assert out[-1].masks.shape[0] == 0  # no instrument: no per-label output, open ones close
    assert node.counters["cache_encodes"] == 1  # the empty update needs no encoding
    assert node.counters["no_instrument_steps"] > 0
    assert "no instrument detected" in capsys.readouterr().out
    assert sum(m.masks.shape[2] for m in out) == spec.shape[1]


def test_sync_vision_waits_for_vision_of_the_media_time(bundle: str) -> None:
    x = signal(11025 * 2)
    spec = stft(x)
    node = Separator(bundle=bundle, sync_vision=True)
    # Audio first, vision later (a slow detector): nothing may be separated before vision
    # covers its time, then the update at or before each step's time is used.
    inputs = [*chunks(spec), ("vision", vision(0.0, ["violin#1"], [11])),
              ("vision", vision(1.0, ["violin#1", "horn#1"], [11, 7])),
              ("vision", EndOfStream(stream="vision")),
              ("spec", EndOfStream(stream="mix", time=len(x)))]
    node.start()
    try:
        for port, msg in inputs[:len(chunks(spec))]:
            assert list(node.handle(port, msg)) == []
        out = [m for port, msg in inputs[len(chunks(spec)):] for _, m in node.handle(port, msg)]
    finally:
        node.stop()
    masks = [m for m in out if isinstance(m, Masks)]
    assert sum(m.masks.shape[2] for m in masks) == spec.shape[1]
    for m in masks:
        t = m.frame_index * 256 / 11025
        assert m.labels == (["violin#1"] if t < 1.0 else ["violin#1", "horn#1"])


def test_onnx_backend_matches_torch(bundle: str, tmp_path: Path) -> None:
    x = signal(11025)
    spec = stft(x)
    inputs = [*chunks(spec), ("spec", EndOfStream(stream="mix", time=len(x)))]
    a = masks_of(run_node(Separator(bundle=bundle, fallback="all", device="cpu"), inputs))
    onnx = Separator(bundle=bundle, fallback="all", backend="onnx",
                     onnx_path=str(tmp_path / "sep.onnx"))  # device "auto"
    b = masks_of(run_node(onnx, inputs))
    assert onnx.report()["onnx_providers"][-1] == "CPUExecutionProvider"
    assert a.shape == (12, 512, spec.shape[1])
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_bad_settings_are_refused(bundle: str) -> None:
    with pytest.raises(ValueError, match="backend 'tf'"):
        Separator(bundle=bundle, backend="tf")
    node = Separator(bundle=bundle, block=30, lookahead=8)
    with pytest.raises(ValueError, match="block \\+ lookahead <= window"):
        node.start()
    node = Separator(bundle=bundle, fallback=["kazoo"])
    with pytest.raises(ValueError, match="kazoo"):
        node.start()
