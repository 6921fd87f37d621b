"""Tests of the MUSIC-layout loader on a tiny layout written here (the way real MUSIC data is laid
out: stereo audio at another rate, CSV paths from another machine, flat or per-class boxes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile

from training.music_data import (
    Clip,
    MusicIndex,
    frame_indices,
    list_ensembles,
    load_audio,
    load_boxes,
    load_frames,
    read_pairs,
)


def _write_clip(root: Path, cls: str, clip_id: str, n_frames: int, rate: int = 22050,
                seconds: float = 2.0, freq: float = 440.0) -> None:
    t = np.arange(int(rate * seconds)) / rate
    left = 0.5 * np.sin(2 * np.pi * freq * t)
    right = 0.1 * np.ones_like(t)  # the downmix of L and R must average them
    (root / "audio" / cls).mkdir(parents=True, exist_ok=True)
    pcm = np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)
    wavfile.write(root / "audio" / cls / f"{clip_id}.wav", rate, pcm)
    fdir = root / "frames" / cls / f"{clip_id}.mp4"
    fdir.mkdir(parents=True)
    for k in range(1, n_frames + 1):
        # the frame number is written into the pixels, so the test knows which it got
        Image.fromarray(np.full((48, 64, 3), k * 10, np.uint8)).save(fdir / f"{k:06d}.jpg")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    root = tmp_path / "MUSIC"
    _write_clip(root, "violin", "abc", 16)
    _write_clip(root, "flute", "xyz", 16, freq=880.0)
    det = root / "detection_results" / "violin"
    det.mkdir(parents=True)
    np.save(det / "abc.mp4.npy", np.array([[1, 11, 0.9, 1, 2, 30, 40],
                                           [2, 11, 0.8, 2, 3, 31, 41]], np.float32))
    (root / "detection_results" / "xyz.mp4.npy").parent.mkdir(exist_ok=True)
    np.save(root / "detection_results" / "xyz.mp4.npy", np.zeros((0, 7), np.float32))
    with (root / "train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        # a path from the machine that made the index, and one relative to the root
        w.writerow(["/home/someone/data/MUSIC/audio/violin/abc.wav",
                    "/home/someone/data/MUSIC/frames/violin/abc.mp4", 16])
        w.writerow(["audio/flute/xyz.wav", "frames/flute/xyz.mp4", 16])
    return root


def test_index_resolves_paths_classes_and_boxes(layout):
    index = MusicIndex.from_csv(layout / "train.csv")
    assert len(index) == 2 and index.classes == ["flute", "violin"]
    violin, flute = index[0], index[1]
    assert violin.audio_path == layout / "audio" / "violin" / "abc.wav"
    assert violin.frames_dir == layout / "frames" / "violin" / "abc.mp4"
    assert violin.class_name == "violin" and violin.clip_id == "abc" and violin.n_frames == 16
    assert violin.det_path == layout / "detection_results" / "violin" / "abc.mp4.npy"
    assert flute.det_path == layout / "detection_results" / "xyz.mp4.npy"  # flat layout
    assert [c.clip_id for c in index.by_class()["flute"]] == ["xyz"]
    boxes = load_boxes(violin)
    assert boxes.shape == (2, 7) and boxes.dtype == np.float32 and boxes[1, 0] == 2
    assert load_boxes(flute).shape == (0, 7)


def test_index_rejects_malformed_rows(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("audio/violin/a.wav,frames/violin/a.mp4,many\n")
    with pytest.raises(ValueError, match="n_frames='many'"):
        MusicIndex.from_csv(bad)
    bad.write_text("audio/violin/a.wav\n")
    with pytest.raises(ValueError, match="expected"):
        MusicIndex.from_csv(bad)


def test_load_audio_resamples_downmixes_and_pads(layout):
    clip = MusicIndex.from_csv(layout / "train.csv")[0]
    x = load_audio(clip, 0.5, 1.0)
    assert x.shape == (11025,) and x.dtype == np.float32
    assert abs(x.mean() - 0.05) < 0.01  # (sine + 0.1) / 2: the right channel's DC, halved
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum[1:]) + 1 - 440) <= 1  # 1 s window: bin = Hz
    tail = load_audio(clip, 1.5, 1.0)  # the file ends at 2.0 s: the rest is zeros
    assert tail.shape == (11025,) and np.abs(tail[6000:]).max() == 0.0
    with pytest.raises(ValueError, match="start_s=-1"):
        load_audio(clip, -1, 1.0)


def test_load_audio_of_compressed_files(tmp_path):
    path = tmp_path / "tone.flac"
    rate = 44100
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 1000 * t) * 32767).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]).T.reshape(1, -1).copy(),
                                           format="s16", layout="stereo")
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    x = load_audio(path, 0.0, 0.5)
    assert x.shape == (5512,) or x.shape == (5513,)
    rms = np.sqrt(np.mean(x[500:5000] ** 2))
    assert abs(rms - 0.3 / np.sqrt(2)) < 0.02
    assert abs(np.argmax(np.abs(np.fft.rfft(x[:5000]))) * 11025 / 5000 - 1000) < 5


def test_load_frames_picks_nearest_and_resizes(layout):
    clip = MusicIndex.from_csv(layout / "train.csv")[0]
    assert list(frame_indices(clip, [0.0, 0.125, 0.51, 99.0])) == [1, 2, 5, 16]
    frames = load_frames(clip, [0.0, 0.5, 99.0], size=32)
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    assert np.allclose([f.mean() for f in frames], [10, 50, 160], atol=2)
    assert load_frames(clip, [0.0]).shape == (1, 48, 64, 3)
    missing = Clip(clip.audio_path, clip.frames_dir, 20, "violin", None)
    with pytest.raises(FileNotFoundError, match="frame 17"):
        load_frames(missing, [2.0])


def test_pairs_and_ensembles(layout):
    with (layout / "test_pairs.csv").open("w", newline="") as f:
        csv.writer(f).writerow(["audio/violin/abc.wav", "frames/violin/abc.mp4", 16,
                                "audio/flute/xyz.wav", "frames/flute/xyz.mp4", 16])
    (a, b), = read_pairs(layout / "test_pairs.csv")
    assert (a.class_name, b.class_name) == ("violin", "flute")
    ens = layout / "ensembles" / "ens_0000"
    (ens / "frames").mkdir(parents=True)
    (ens / "meta.json").write_text(json.dumps({"id": "ens_0000", "classes": ["flute", "violin"],
                                               "n_frames": 16, "fps": 8}))
    unfinished = layout / "ensembles" / ".ens_0001.tmp"
    unfinished.mkdir()
    (unfinished / "meta.json").write_text((ens / "meta.json").read_text())  # not yet renamed
    (e,) = list_ensembles(layout)
    assert e.classes == ["flute", "violin"] and e.stem_path("flute").name == "flute.wav"
    assert e.as_clip().det_path == ens / "boxes.npy"
