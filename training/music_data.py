"""Read the MUSIC / MUSIC-21 dataset layout (and SynthMUSIC, which copies it): index CSVs, audio,
frames and detection boxes. Torch-free: the training code builds its Datasets on top.

Layout (Sound-of-Pixels convention): `audio/<class>/<id>.(wav|mp3)`,
`frames/<class>/<id>.mp4/000001.jpg ...` (8 fps), `detection_results/<class>/<id>.mp4.npy` with
rows [frame_idx (1-based), class_id, score, x1, y1, x2, y2]. An index CSV row is
`audio_path,frames_dir,n_frames`; paths may be absolute, relative to the dataset root, or
absolute paths from another machine (then re-rooted at their `audio/` / `frames/` component).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FPS = 8.0
SAMPLE_RATE = 11025
BOX_COLUMNS = ("frame_idx", "class_id", "score", "x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class Clip:
    """One solo video of the index."""

    audio_path: Path
    frames_dir: Path
    n_frames: int
    class_name: str
    det_path: Path | None  # detection_results file, None when the dataset has none for it
    fps: float = FPS

    @property
    def clip_id(self) -> str:
        """The video id (frames folder name without its `.mp4`)."""
        name = self.frames_dir.name
        return name.removesuffix(".mp4")

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps


def _resolve(path_text: str, root: Path, anchor: str) -> Path:
    """A CSV path as it exists here: as written, under root, or re-rooted at `anchor/`."""
    p = Path(path_text)
    if p.is_absolute() and p.exists():
        return p
    if not p.is_absolute() and (root / p).exists():
        return root / p
    parts = p.parts
    if anchor in parts:
        i = len(parts) - 1 - parts[::-1].index(anchor)  # the last `audio/` component
        return root.joinpath(*parts[i:])
    return p if p.is_absolute() else root / p


def _find_det(root: Path, class_name: str, frames_dir: Path) -> Path | None:
    name = frames_dir.name  # '<id>.mp4'
    for cand in (root / "detection_results" / class_name / f"{name}.npy",
                 root / "detection_results" / f"{name}.npy"):  # flat layout of some releases
        if cand.is_file():
            return cand
    return None


class MusicIndex(Sequence[Clip]):
    """The clips of one index CSV, in file order."""

    def __init__(self, clips: list[Clip], root: Path):
        self.clips = clips
        self.root = root

    @classmethod
    def from_csv(cls, csv_path: str | Path, root: str | Path | None = None,
                 fps: float = FPS) -> MusicIndex:
        """Read a Sound-of-Pixels index (rows: audio path, frames dir, n_frames).

        root: the dataset folder; default: the CSV's folder.
        """
        csv_path = Path(csv_path)
        root = Path(root) if root is not None else csv_path.parent
        if not csv_path.is_file():
            raise FileNotFoundError(f"index CSV not found: {csv_path}")
        clips = []
        with csv_path.open(newline="") as f:
            for line_no, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 3:
                    raise ValueError(f"{csv_path}:{line_no}: {row!r}; expected "
                                     "'audio_path,frames_dir,n_frames'")
                try:
                    n_frames = int(row[2])
                except ValueError:
                    raise ValueError(f"{csv_path}:{line_no}: n_frames={row[2]!r} is not an "
                                     "integer") from None
                audio = _resolve(row[0].strip(), root, "audio")
                frames = _resolve(row[1].strip(), root, "frames")
                class_name = audio.parent.name
                clips.append(Clip(audio, frames, n_frames, class_name,
                                  _find_det(root, class_name, frames), fps))
        return cls(clips, root)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i):  # type: ignore[override]
        return self.clips[i]

    def __iter__(self) -> Iterator[Clip]:
        return iter(self.clips)

    @property
    def classes(self) -> list[str]:
        """Class names present, sorted."""
        return sorted({c.class_name for c in self.clips})

    def by_class(self) -> dict[str, list[Clip]]:
        out: dict[str, list[Clip]] = {}
        for c in self.clips:
            out.setdefault(c.class_name, []).append(c)
        return out


def read_pairs(csv_path: str | Path, root: str | Path | None = None,
               fps: float = FPS) -> list[tuple[Clip, Clip]]:
    """A fixed list of test pairs: rows of two index rows side by side (6 columns)."""
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    pairs = []
    with csv_path.open(newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 6:
                raise ValueError(f"{csv_path}:{line_no}: {len(row)} columns; expected 6 "
                                 "(audio, frames, n_frames for each clip of the pair)")
            clips = []
            for a, fr, n in (row[:3], row[3:]):
                audio = _resolve(a, root, "audio")
                frames = _resolve(fr, root, "frames")
                clips.append(Clip(audio, frames, int(n), audio.parent.name,
                                  _find_det(root, audio.parent.name, frames), fps))
            pairs.append((clips[0], clips[1]))
    return pairs


def _read_any_audio(path: Path, target_rate: int) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 and its rate: WAV via scipy at the file's rate; anything
    else via PyAV, already at `target_rate`."""
    if path.suffix.lower() == ".wav":
        from scipy.io import wavfile

        rate, data = wavfile.read(path, mmap=True)
        data = np.asarray(data)
        if data.dtype == np.int16:
            audio = data.astype(np.float32) / 32768.0
        elif data.dtype == np.int32:
            audio = data.astype(np.float32) / 2147483648.0
        elif data.dtype == np.uint8:
            audio = (data.astype(np.float32) - 128.0) / 128.0
        else:
            audio = data.astype(np.float32)
        return (audio[None] if audio.ndim == 1 else audio.T), int(rate)
    import av

    # compressed audio (MUSIC's mp3 / m4a): decode and resample to planar float; the downmix
    # is the caller's plain channel mean (FFmpeg's own would scale by -3 dB, unlike the WAVs)
    resampler = av.AudioResampler(format="fltp", rate=target_rate)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
    chunks += [f.to_ndarray() for f in resampler.resample(None)]
    if not chunks:
        raise ValueError(f"{path}: no audio samples")
    return np.concatenate(chunks, axis=1).astype(np.float32), target_rate


def load_audio(clip: Clip | str | Path, start_s: float = 0.0, dur_s: float | None = None,
               sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio at `sr` from `start_s` for `dur_s` seconds (None: to the end).

    Returns (round(dur_s * sr),) samples; a window running past the end is zero-padded.
    """
    path = clip.audio_path if isinstance(clip, Clip) else Path(clip)
    if start_s < 0 or (dur_s is not None and dur_s <= 0):
        raise ValueError(f"start_s={start_s}, dur_s={dur_s}; need start_s >= 0, dur_s > 0")
    audio, rate = _read_any_audio(path, sr)
    mono = audio.mean(axis=0)  # (samples,)
    a = round(start_s * rate)
    b = len(mono) if dur_s is None else a + round(dur_s * rate)
    seg = mono[a:b]
    if rate != sr:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(rate, sr)
        seg = resample_poly(seg, sr // g, rate // g).astype(np.float32)
    n_out = round(dur_s * sr) if dur_s is not None else len(seg)
    out = np.zeros(n_out, np.float32)
    out[: min(n_out, len(seg))] = seg[:n_out]
    return out


def frame_indices(clip: Clip, times: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based frame numbers nearest to `times` (s); frame i shows time (i - 1) / fps."""
    idx = np.round(np.asarray(times, np.float64) * clip.fps).astype(int) + 1
    return np.clip(idx, 1, clip.n_frames)


def load_frames(clip: Clip, times: Sequence[float] | np.ndarray,
                size: int | tuple[int, int] | None = None) -> np.ndarray:
    """RGB frames nearest to `times` -> (T, H, W, 3) uint8, resized to `size` (int: square,
    (H, W), None: as stored)."""
    from PIL import Image

    if isinstance(size, int):
        size = (size, size)
    frames = []
    for i in frame_indices(clip, times):
        path = clip.frames_dir / f"{i:06d}.jpg"
        if not path.is_file():
            raise FileNotFoundError(f"frame {i} of {clip.clip_id} not found: {path}")
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            frames.append(np.asarray(im))
    return np.stack(frames)


def load_boxes(clip: Clip | str | Path) -> np.ndarray:
    """Detection / ground-truth boxes -> (N, 7) float32 rows [frame_idx (1-based), class_id,
    score, x1, y1, x2, y2]; (0, 7) when the clip has no detection file."""
    path = clip.det_path if isinstance(clip, Clip) else Path(clip)
    if path is None:
        return np.zeros((0, 7), np.float32)
    boxes = np.load(path, allow_pickle=False)
    boxes = np.asarray(boxes, np.float32)
    if boxes.size == 0:
        return np.zeros((0, 7), np.float32)
    if boxes.ndim != 2 or boxes.shape[1] < 7:
        raise ValueError(f"{path}: boxes of shape {boxes.shape}; expected (N, 7) rows "
                         f"{list(BOX_COLUMNS)}")
    return boxes[:, :7]


@dataclass(frozen=True)
class Ensemble:
    """One SynthMUSIC ensemble clip: mixture, stems per class, frames, ground-truth boxes."""

    root: Path
    clip_id: str
    classes: list[str]
    n_frames: int
    fps: float

    @property
    def mix_path(self) -> Path:
        return self.root / "mix.wav"

    def stem_path(self, class_name: str) -> Path:
        return self.root / "stems" / f"{class_name}.wav"

    @property
    def frames_dir(self) -> Path:
        return self.root / "frames"

    @property
    def boxes_path(self) -> Path:
        return self.root / "boxes.npy"

    @property
    def video_path(self) -> Path:
        return self.root / "video.mkv"

    def as_clip(self) -> Clip:
        """The mixture seen as a Clip (load_audio / load_frames / load_boxes work on it)."""
        return Clip(self.mix_path, self.frames_dir, self.n_frames, "ensemble", self.boxes_path,
                    self.fps)


def list_ensembles(dataset_root: str | Path) -> list[Ensemble]:
    """The ensemble clips of a SynthMUSIC dataset (complete ones only), sorted by id."""
    folder = Path(dataset_root) / "ensembles"
    out = []
    for meta_path in sorted(folder.glob("*/meta.json")):
        if meta_path.parent.name.startswith("."):
            continue  # an ensemble still being written (renamed into place when complete)
        meta = json.loads(meta_path.read_text())
        out.append(Ensemble(meta_path.parent, meta["id"], list(meta["classes"]),
                            int(meta["n_frames"]), float(meta["fps"])))
    return out
