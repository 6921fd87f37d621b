"""Frames, boxes and crops of the MUSIC layout for the visual front end: tracks of one class
from detection rows, crop tubes, and the detector's own tracks (detector-named queries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from models.features import crop_image


def read_frame(frames_dir: Path, idx: int) -> Image.Image:
    """1-based frame `idx` of a frames folder as an RGB image."""
    with Image.open(Path(frames_dir) / f"{idx:06d}.jpg") as im:
        return im.convert("RGB")


def track_from_rows(rows: np.ndarray, class_id: int, n_frames: int) -> np.ndarray | None:
    """Boxes of one class per frame from rows [frame_idx (1-based), class_id, score, x1..y2]:
    the best-scoring row of that class in each frame; frames without one take the nearest
    frame's box. -> (n_frames, 4) or None when the class never appears."""
    rows = np.asarray(rows, np.float32).reshape(-1, 7)
    rows = rows[rows[:, 1] == class_id]
    if len(rows) == 0:
        return None
    out = np.full((n_frames, 4), np.nan, np.float32)
    best = np.full(n_frames, -1.0)
    for r in rows:
        i = int(r[0]) - 1
        if 0 <= i < n_frames and r[2] > best[i]:
            best[i] = r[2]
            out[i] = r[3:7]
    have = np.where(best >= 0)[0]
    if len(have) == 0:
        return None
    nearest = have[np.abs(np.arange(n_frames)[:, None] - have[None]).argmin(axis=1)]
    return out[nearest]


def crop(img: Image.Image, box: np.ndarray, size: int, margin: float = 0.1) -> np.ndarray:
    """Crop of box (x1, y1, x2, y2) widened by `margin` -> (size, size, 3) uint8: the engine's
    crop (models.features.crop_image), so cached features match the live ones."""
    return crop_image(img, box, size, margin)


def crop_tube(frames_dir: Path, track: np.ndarray, frame_ids: np.ndarray, size: int
              ) -> np.ndarray:
    """Crops of one track at 1-based frame ids -> (T, size, size, 3) uint8."""
    return np.stack([crop(read_frame(frames_dir, int(i)), track[int(i) - 1], size)
                     for i in frame_ids])


def detector_rows(detector, frames_dir: Path, n_frames: int, stride: int = 1,
                  score_min: float = 0.3, batch: int = 16) -> np.ndarray:
    """Run an OnnxDetector on every `stride`-th frame -> rows like detection_results
    [frame_idx, class_id, score, x1, y1, x2, y2] of detections with score >= score_min."""
    ids = np.arange(1, n_frames + 1, stride)
    rows = []
    for a in range(0, len(ids), batch):
        chunk = ids[a:a + batch]
        imgs = np.stack([np.asarray(read_frame(frames_dir, int(i))) for i in chunk])
        boxes, scores, cls = detector(imgs)
        for j, i in enumerate(chunk):
            keep = scores[j] >= score_min
            for b, s, c in zip(boxes[j][keep], scores[j][keep], cls[j][keep], strict=True):
                rows.append([i, c, s, *b])
    return np.asarray(rows, np.float32).reshape(-1, 7)


def detected_classes(rows: np.ndarray, n_sampled: int, min_fraction: float = 0.5
                     ) -> list[tuple[int, float]]:
    """Classes detected in at least min_fraction of the sampled frames, with their summed
    score, best first: the tracks that become detector-named queries."""
    out = []
    for c in np.unique(rows[:, 1]).astype(int):
        r = rows[rows[:, 1] == c]
        if len(np.unique(r[:, 0])) >= min_fraction * n_sampled:
            out.append((int(c), float(r[:, 2].sum())))
    return sorted(out, key=lambda t: -t[1])


def name_clip(detector, frames_dir: Path, n_frames: int, solo: bool, stride: int = 2
              ) -> tuple[list[int], np.ndarray]:
    """The classes a detector names in a clip, from every `stride`-th frame, and its rows.
    An ensemble is every class detected in >= half of the sampled frames; a solo clip is one
    class, its most confident track (or its single best detection when no class is steady),
    with no dataset label involved. -> (class ids, best first; detector rows)."""
    rows = detector_rows(detector, frames_dir, n_frames, stride)
    found = [c for c, _ in detected_classes(rows, len(range(1, n_frames + 1, stride)))]
    if solo:
        found = found[:1] or ([int(rows[np.argmax(rows[:, 2]), 1])] if len(rows) else [])
    return found, rows
