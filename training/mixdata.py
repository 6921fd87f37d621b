"""Mix-and-Separate data: every solo clip's audio and cached visual features preloaded into
memory (small at 11025 Hz), K clips of different classes drawn per example, a random window of
the model's n_frames, summed into the mixture. STFTs are computed per batch by the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.spectral import HOP
from training.music_data import MusicIndex, load_audio
from training.separate import motion_len, motion_window


@dataclass
class SoloClip:
    """A preloaded solo clip: audio (N,), class id, object feature, motion tokens (or its
    crop tube (n_video, H, W, 3) uint8 when loaded with tubes=True)."""

    clip_id: str
    class_name: str
    class_id: int
    audio: np.ndarray
    obj: np.ndarray
    motion: np.ndarray


def feature_stem(features: Path, variant: str, class_name: str, clip_id: str) -> Path:
    return Path(features) / variant / class_name / clip_id


def load_solo(data: Path, split: str, class_names: list[str], features: Path | None = None,
              variant: str = "gt", tubes: bool = False) -> list[SoloClip]:
    """All clips of <data>/<split>.csv with their cached features (<data>/features by
    default); tubes=True loads the crop tubes (.tube.npy) in place of the motion tokens."""
    motion = "tube" if tubes else "motion"
    features = features or Path(data) / "features"
    out = []
    for c in MusicIndex.from_csv(Path(data) / f"{split}.csv"):
        stem = feature_stem(features, variant, c.class_name, c.clip_id)
        for kind in ("obj", motion):
            if not Path(f"{stem}.{kind}.npy").is_file():
                raise FileNotFoundError(f"no cached {stem}.{kind}.npy; run python -m "
                                        "training.encoders first" + " with --tubes" * tubes)
        out.append(SoloClip(c.clip_id, c.class_name, class_names.index(c.class_name),
                            load_audio(c), np.load(f"{stem}.obj.npy"),
                            np.load(f"{stem}.{motion}.npy")))
    return out


class MixSampler:
    """Draws Mix-and-Separate examples from preloaded clips with its own numpy Generator
    (its state is part of a resumable checkpoint)."""

    def __init__(self, clips: list[SoloClip], n_frames: int, n_mix: int = 2, seed: int = 0,
                 gain_db: float = 3.0) -> None:
        by_class: dict[int, list[SoloClip]] = {}
        for c in clips:
            by_class.setdefault(c.class_id, []).append(c)
        if len(by_class) < n_mix:
            raise ValueError(f"n_mix={n_mix} needs clips of >= {n_mix} classes, "
                             f"got {len(by_class)}")
        self.by_class = by_class
        self.n_frames, self.n_mix, self.gain_db = n_frames, n_mix, gain_db
        self.n_samples = (n_frames - 1) * HOP  # stft() of it gives exactly n_frames frames
        self.rng = np.random.default_rng(seed)

    def draw(self, cid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A random window of a random clip of class ``cid`` -> (its audio with a random gain
        (n_samples,), object feature, motion tokens (Tm, D), motion pad (Tm,))."""
        group = self.by_class[cid]
        clip = group[int(self.rng.integers(len(group)))]
        n_win = (len(clip.audio) - self.n_samples) // HOP
        start = int(self.rng.integers(0, max(n_win, 0) + 1))  # in STFT frames
        seg = clip.audio[start * HOP:start * HOP + self.n_samples]
        seg = np.pad(seg, (0, self.n_samples - len(seg)))
        gain = 10 ** (self.rng.uniform(-self.gain_db, self.gain_db) / 20)
        mot, pad = motion_window(clip.motion, start, self.n_frames)
        return seg * gain, clip.obj, mot, pad

    @staticmethod
    def stack(rows: list[list[tuple]], ids: list[list[int]]) -> dict[str, np.ndarray]:
        """Rows of ``draw`` results and their class ids -> the arrays of ``sample``."""
        return {"sources": np.array([[r[0] for r in row] for row in rows], np.float32),
                "obj": np.array([[r[1] for r in row] for row in rows], np.float32),
                "class_ids": np.array(ids, np.int64),
                "motion": np.array([[r[2] for r in row] for row in rows], np.float32),
                "motion_pad": np.array([[r[3] for r in row] for row in rows], bool)}

    def sample(self, batch: int) -> dict[str, np.ndarray]:
        """-> sources (B, K, n_samples), obj (B, K, obj_dim), class_ids (B, K),
        motion (B, K, Tm, D), motion_pad (B, K, Tm) bool."""
        keys = sorted(self.by_class)
        rows, ids = [], []
        for _ in range(batch):  # classes, then their draws, example by example (as logged runs)
            chosen = [int(c) for c in self.rng.choice(keys, size=self.n_mix, replace=False)]
            rows.append([self.draw(c) for c in chosen])
            ids.append(chosen)
        out = self.stack(rows, ids)
        assert out["motion"].shape[2] == motion_len(self.n_frames)
        return out
