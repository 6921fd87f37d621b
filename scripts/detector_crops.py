"""Which test clips does the detector crop differently from the ground truth? Per test solo
clip: the cosine between the object feature of its detector-named crop and that of its
ground-truth crop (both from the feature cache that training.evaluate reads), the class the
detector named, and with --detector the mean IoU of the detected and the ground-truth boxes
over the sampled frames. The clips with the lowest cosine come first.

    python scripts/detector_crops.py --data data/synth \
        --detector models/checkpoints/cpu/detector.onnx --top 5

Sound-of-Pixels is steered by that feature alone, iQuery also by the named class's query: a
clip whose detected crop reads unlike its instrument can cost the one and not the other
(docs/RESULTS.md section 64).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.boxes import box_iou  # noqa: E402
from training.instruments import class_names  # noqa: E402
from training.music_data import Clip, MusicIndex, load_boxes  # noqa: E402
from training.visual_data import name_clip, track_from_rows  # noqa: E402


def feature_cosine(features: Path, clip: Clip) -> float:
    """Cosine between a test clip's detector-named and ground-truth object features."""
    stems = [features / kind / clip.class_name / clip.clip_id for kind in ("det", "gt")]
    for s in stems:
        if not Path(f"{s}.obj.npy").is_file():
            raise SystemExit(f"error: no cached feature {s}.obj.npy (run training.encoders)")
    det, gt = (np.load(f"{s}.obj.npy").astype(np.float64) for s in stems)
    return float(det @ gt / max(np.linalg.norm(det) * np.linalg.norm(gt), 1e-12))


def track_iou(detector, clip: Clip, class_id: int, stride: int = 2) -> float:
    """Mean IoU of the detector's track (named as training.encoders names it) and the
    ground-truth track of `class_id`, over every `stride`-th frame; 0 where nothing is found."""
    found, rows = name_clip(detector, clip.frames_dir, clip.n_frames, solo=True, stride=stride)
    det = track_from_rows(rows, found[0], clip.n_frames) if found else None
    gt = track_from_rows(load_boxes(clip), class_id, clip.n_frames)
    if det is None or gt is None:
        return 0.0
    frames = np.arange(0, clip.n_frames, stride)
    return float(np.diag(box_iou(det[frames], gt[frames])).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/synth"))
    ap.add_argument("--features", type=Path, default=None, help="default: <data>/features")
    ap.add_argument("--detector", type=Path, default=None,
                    help="ONNX detector: also the mean box IoU per clip (runs it on the frames)")
    ap.add_argument("--top", type=int, default=10, help="clips to list (default 10)")
    args = ap.parse_args(argv)
    features = args.features or args.data / "features"
    names = class_names()
    try:
        clips = list(MusicIndex.from_csv(args.data / "test.csv"))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    detector = None
    if args.detector is not None:
        from training.detector import OnnxDetector
        detector = OnnxDetector(args.detector)
    rows = []
    for c in clips:
        det_cls = features / "det" / c.class_name / f"{c.clip_id}.cls.npy"
        named = names[int(np.load(det_cls))] if det_cls.is_file() else "?"
        iou = (track_iou(detector, c, names.index(c.class_name)) if detector is not None
               else float("nan"))
        rows.append((feature_cosine(features, c), c.clip_id, named, iou))
    rows.sort()
    cos = np.array([r[0] for r in rows])
    print(f"{len(rows)} test clips: feature cosine median {np.median(cos):.3f}, "
          f"min {cos.min():.3f}\n\n| clip | detector named | feature cosine | mean box IoU |"
          "\n|---|---|---:|---:|")
    for c, clip_id, named, iou in rows[:args.top]:
        print(f"| {clip_id} | {named} | {c:.3f} | {'-' if np.isnan(iou) else f'{iou:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
