"""Motion node: tracks + frames -> object features and motion tokens per track, at the tracks'
media time, whatever order frames and tracks arrive in."""

from __future__ import annotations

import numpy as np
import pytest

from engine.messages import EndOfStream, VideoFrame, VisionUpdate
from engine.testing import run_node
from nodes.bundle import make_random_bundle
from nodes.motion import Motion


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.getbasetemp() / "random_bundle"
    if not (path / "bundle.json").is_file():
        make_random_bundle(path)
    return str(path)


def frame(i: int) -> tuple[str, VideoFrame]:
    rng = np.random.default_rng(i)
    return "video", VideoFrame(stream="video", pts_ns=int(i * 0.125e9),
                               image=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def tracks(pts_s: float, n: int) -> tuple[str, VisionUpdate]:
    boxes = np.array([[4, 4, 30, 40], [34, 4, 60, 40]], np.float32)[:n]
    return "tracks", VisionUpdate(stream="tracks", pts_ns=int(pts_s * 1e9),
                                  labels=["violin#1", "flute#1"][:n], track_ids=[1, 2][:n],
                                  boxes=boxes, arrays={"class_ids": np.array([11, 6][:n])})


def run(bundle: str, inputs: list) -> list[VisionUpdate]:
    # On the CPU: the features are compared with CPU references (tests/test_cuda.py: the GPU).
    out = run_node(Motion(bundle=bundle, device="cpu"), inputs)
    assert isinstance(out[-1][1], EndOfStream)
    return [m for _, m in out if isinstance(m, VisionUpdate)]


def test_features_per_track_do_not_depend_on_arrival_order(bundle: str) -> None:
    frames = [frame(i) for i in range(16)]
    # Tracks late (a slow detector) or early (frames lagging): same features.
    late = run(bundle, [*frames, tracks(0.0, 2), tracks(1.0, 1)])
    early = run(bundle, [tracks(0.0, 2), frames[0], tracks(1.0, 1), *frames[1:]])
    assert [u.labels for u in late] == [["violin#1", "flute#1"], ["violin#1"]]
    for a, b in zip(late, early, strict=True):
        assert a.pts_ns == b.pts_ns
        assert a.arrays["obj_feats"].shape == (len(a.labels), 64)
        assert a.arrays["motion"].shape == (len(a.labels), 4, 64)  # 8 frames / time stride 2
        np.testing.assert_allclose(a.arrays["obj_feats"], b.arrays["obj_feats"], atol=1e-5)
        np.testing.assert_allclose(a.arrays["motion"], b.arrays["motion"], atol=1e-5)
    assert late[0].arrays["class_ids"].tolist() == [11, 6]
    # The two tracks see different crops.
    assert not np.allclose(late[0].arrays["obj_feats"][0], late[0].arrays["obj_feats"][1])


def test_no_tracks_gives_an_empty_update_and_no_frames_waits(bundle: str) -> None:
    out = run(bundle, [frame(0), tracks(0.0, 0)])
    assert out[0].labels == [] and out[0].arrays["obj_feats"].shape == (0, 64)
    node = Motion(bundle=bundle)
    got = run_node(node, [tracks(0.0, 1)])  # no frame ever came: nothing to crop
    assert [type(m).__name__ for _, m in got] == ["EndOfStream"]
    assert node.counters["updates_without_frames"] == 1


def test_object_feature_pools_crops_at_the_tracks_own_detections(bundle: str) -> None:
    """A moving player: the feature pools crops spread over the track's detection history,
    each cut from its own frame with its own box (as the training cache does), not the newest
    box over older frames; without a history, the crop of the update's own frame."""
    from models.features import crop_image, normalise, object_feature
    from nodes.bundle import load_bundle

    frames = [frame(i) for i in range(25)]
    # Detections every 2 frames (0.25 s), the player moving 4 px right each time.
    det = {k: np.array([2 + 4 * k, 4, 26 + 4 * k, 40], np.float32) for k in range(0, 17, 2)}

    def update(at: int, ks: list[int], history: bool = True) -> tuple[str, VisionUpdate]:
        arrays = {"class_ids": np.array([11])}
        if history:
            arrays |= {"history_boxes": np.stack([np.zeros(4, np.float32)]
                                                 + [det[k] for k in ks])[None],
                       "history_pts": np.array([[-1] + [int(k * 0.125e9) for k in ks]])}
        return "tracks", VisionUpdate(stream="tracks", pts_ns=int(at * 0.125e9),
                                      labels=["violin#1"], track_ids=[1],
                                      boxes=det[at][None], arrays=arrays)

    b = load_bundle(bundle)
    enc, v = b.load_object_encoder("cpu"), b.visual

    def expected(ks: list[int]) -> np.ndarray:
        crops = [crop_image(frames[k][1].image, det[k], v["obj_crop"], v["obj_margin"])
                 for k in ks]
        return object_feature(enc, normalise(np.stack(crops)), v["obj_frames"]).numpy()

    n = v["obj_frames"]
    assert n >= 2
    out = run(bundle, [*frames, update(2, [0, 2]), update(16, [2, 4, 6, 8, 10, 12, 14, 16]),
                       update(8, [8], history=False)])
    np.testing.assert_allclose(out[0].arrays["obj_feats"][0], expected([0, 2]), atol=1e-5)
    spread = np.linspace(0, 7, n).round().astype(int)  # evenly over the 8 detections
    np.testing.assert_allclose(out[1].arrays["obj_feats"][0],
                               expected([[2, 4, 6, 8, 10, 12, 14, 16][j] for j in spread]),
                               atol=1e-5)
    np.testing.assert_allclose(out[2].arrays["obj_feats"][0], expected([8]), atol=1e-5)
    # Not the newest box over the older frames.
    old_way = object_feature(enc, normalise(np.stack([
        crop_image(frames[k][1].image, det[16], v["obj_crop"], v["obj_margin"])
        for k in (2, 16)])), n).numpy()
    assert not np.allclose(out[1].arrays["obj_feats"][0], old_way, atol=1e-3)
