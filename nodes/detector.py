"""Detector node: every ~``interval_s`` of video, the bundle's ONNX detector finds instruments and
an IoU + class tracker turns detections into stable tracks (``violin#1``).

The tracker matches a detection to a live track of the same class by greedy highest IoU; an
unmatched detection opens a new track (numbered per class from 1, never reused); a track missed
by ``max_missed`` consecutive updates is dropped and reported (``info["dropped"]``). A missed but
not yet dropped track keeps its last box, so one bad frame does not make an output flicker.

Before tracking, detections of *different* classes on one object (IoU >= ``class_iou_threshold``)
keep only the highest score: the detector's NMS is per class, so one player otherwise comes back
as flute + violin + horn on the same box, each opening a track and a separated output that all
carry the same source (or, on a neighbour's box, the neighbour's sound under the wrong class).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.messages import EndOfStream, Message, VideoFrame, VisionUpdate
from engine.node import Node, Outputs
from models.boxes import box_iou

DEVICES = ("auto", "cpu", "cuda")


def suppress_cross_class(boxes: np.ndarray, class_ids: np.ndarray, scores: np.ndarray,
                         iou_threshold: float) -> np.ndarray:
    """Indices of the detections (boxes (K, 4), class_ids (K,), scores (K,)) that survive a
    class-agnostic NMS at ``iou_threshold``, best score first -> (K',) int64."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order.tolist():
        if keep and box_iou(boxes[keep], boxes[i:i + 1]).max() >= iou_threshold:
            continue
        keep.append(i)
    return np.array(keep, np.int64)


@dataclass
class Track:
    """One tracked instrument."""

    track_id: int
    class_id: int
    label: str
    box: np.ndarray
    score: float
    missed: int = 0
    spans: list[list[float]] = field(default_factory=list)  # [first_s, last_s] while seen


class IoUTracker:
    """Greedy IoU + class tracker with stable, per-class numbered labels."""

    def __init__(self, classes: list[str], *, iou_threshold: float = 0.3,
                 max_missed: int = 3) -> None:
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        if max_missed < 1:
            raise ValueError(f"max_missed must be >= 1 update, got {max_missed}")
        self.classes = classes
        self.iou_threshold, self.max_missed = iou_threshold, max_missed
        self.tracks: list[Track] = []
        self.finished: list[Track] = []  # dropped tracks, for the report
        self._next_id = 1
        self._per_class: dict[int, int] = {}

    def update(self, boxes: np.ndarray, class_ids: np.ndarray, scores: np.ndarray,
               time_s: float) -> tuple[list[Track], list[Track]]:
        """Detections boxes (K, 4), class_ids (K,), scores (K,) at ``time_s`` ->
        (live tracks in id order, tracks dropped by this update)."""
        matched_tracks: set[int] = set()
        matched_dets: set[int] = set()
        for cid in np.unique(class_ids).tolist():
            dets = np.flatnonzero(class_ids == cid)
            cands = [i for i, t in enumerate(self.tracks) if t.class_id == cid]
            if not cands:
                continue
            iou = box_iou(np.stack([self.tracks[i].box for i in cands]), boxes[dets])
            while iou.size and iou.max() >= self.iou_threshold:
                ti, di = np.unravel_index(int(iou.argmax()), iou.shape)
                t, d = self.tracks[cands[ti]], int(dets[di])
                seen_before = t.missed == 0 and t.spans
                t.box, t.score, t.missed = boxes[d].copy(), float(scores[d]), 0
                if seen_before:
                    t.spans[-1][1] = time_s
                else:
                    t.spans.append([time_s, time_s])
                matched_tracks.add(cands[ti])
                matched_dets.add(d)
                iou[ti, :] = -1.0
                iou[:, di] = -1.0
        dropped = []
        for i, t in enumerate(self.tracks):
            if i not in matched_tracks:
                t.missed += 1
                if t.missed >= self.max_missed:
                    dropped.append(t)
        for d in range(len(class_ids)):
            if d in matched_dets:
                continue
            cid = int(class_ids[d])
            n = self._per_class[cid] = self._per_class.get(cid, 0) + 1
            self.tracks.append(Track(self._next_id, cid, f"{self.classes[cid]}#{n}",
                                     boxes[d].copy(), float(scores[d]),
                                     spans=[[time_s, time_s]]))
            self._next_id += 1
        self.tracks = [t for t in self.tracks if t not in dropped]
        self.finished.extend(dropped)
        return sorted(self.tracks, key=lambda t: t.track_id), dropped


def onnx_providers(device: str) -> list[str]:
    """Execution providers for ``device``: CUDA first when asked for (or "auto" and usable)."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f"device {device!r}; allowed: {list(DEVICES)}")
    have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda":
        if not have_cuda:
            raise ValueError("device 'cuda' asked for but onnxruntime has no "
                             "CUDAExecutionProvider")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and have_cuda:
        import torch  # onnxruntime-gpu lists CUDA even on machines without a GPU

        if torch.cuda.is_available():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Detector(Node):
    """VideoFrames in; a tracks VisionUpdate out every ``interval_s`` of video time.

    The update has ``labels`` ("violin#1"), ``track_ids``, ``boxes`` (N, 4) in the frame's
    pixels and ``arrays`` "class_ids" (N,) int64, "scores" (N,), "missed" (N,) int64;
    ``info["dropped"]`` lists the labels dropped by this update. ``input_size`` (pixels of the
    longer side) resizes frames for the detector; boxes come back in frame pixels.
    ``class_iou_threshold``: detections of other classes overlapping a better one this much are
    dropped (one object, one class; 1.0 keeps only identical boxes apart).
    """

    inputs = {"video": "pull"}
    outputs = {"tracks": "push"}

    def __init__(self, *, bundle: str, interval_s: float = 1.0,
                 score_threshold: float | None = None,
                 iou_threshold: float = 0.3, class_iou_threshold: float = 0.5,
                 max_missed: int = 3, input_size: int | None = None, device: str = "auto",
                 threads: int = 1, report_path: str | None = None) -> None:
        super().__init__()
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        if device not in DEVICES:
            raise ValueError(f"device {device!r}; allowed: {list(DEVICES)}")
        if not 0.0 < class_iou_threshold <= 1.0:
            raise ValueError(f"class_iou_threshold must be in (0, 1], got {class_iou_threshold}")
        self.class_iou_threshold = class_iou_threshold
        self.bundle_path, self.interval_s = bundle, interval_s
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.max_missed, self.input_size, self.device = max_missed, input_size, device
        self.threads, self.report_path = threads, report_path
        self.session: Any = None
        self._last_ns: int | None = None

    def start(self) -> None:
        """Load the bundle's detector into onnxruntime."""
        import onnxruntime as ort

        from nodes.bundle import load_bundle

        bundle = load_bundle(self.bundle_path)
        self.classes = bundle.classes
        if self.score_threshold is None:  # the threshold the bundle's features were made with
            self.score_threshold = bundle.visual["score_threshold"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads  # audio shares the CPU: vision takes little
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(bundle.detector_path), opts,
                                            providers=onnx_providers(self.device))
        self.tracker = IoUTracker(self.classes, iou_threshold=self.iou_threshold,
                                  max_missed=self.max_missed)

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """image (H, W, 3) uint8 -> boxes (K, 4) in its pixels, class_ids (K,), scores (K,),
        above the score threshold and naming a class of the bundle."""
        h, w = image.shape[:2]
        scale = 1.0
        if self.input_size and max(h, w) != self.input_size:
            from PIL import Image

            scale = self.input_size / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], np.float32) / 255.0
        boxes, scores, class_ids = self.session.run(["boxes", "scores", "class_ids"],
                                                    {"images": x})
        boxes, scores, class_ids = boxes[0] / scale, scores[0], class_ids[0].astype(np.int64)
        valid = (class_ids >= 0) & (class_ids < len(self.classes))
        if (~valid).any():
            self.counters["unknown_class"] += int((~valid).sum())
        keep = np.flatnonzero(valid & (scores >= self.score_threshold))
        boxes, class_ids, scores = boxes[keep], class_ids[keep], scores[keep]
        best = suppress_cross_class(boxes, class_ids, scores, self.class_iou_threshold)
        self.counters["cross_class_suppressed"] += len(keep) - len(best)
        return boxes[best].astype(np.float32), class_ids[best], scores[best].astype(np.float32)

    def handle(self, port: str, msg: Message) -> Outputs:
        """A due VideoFrame -> detect + track -> VisionUpdate; EndOfStream passed on."""
        if isinstance(msg, EndOfStream):
            yield "tracks", EndOfStream(stream="tracks", reason=msg.reason, time=msg.time)
            return
        if not isinstance(msg, VideoFrame):
            return
        # Half a frame of slack: frame instants rarely land exactly on the interval.
        if self._last_ns is not None and msg.pts_ns - self._last_ns < self.interval_s * 1e9 * 0.95:
            return
        self._last_ns = msg.pts_ns
        boxes, class_ids, scores = self.detect(np.asarray(msg.image))
        tracks, dropped = self.tracker.update(boxes, class_ids, scores, msg.pts_ns / 1e9)
        self.counters["updates"] += 1
        self.counters["dropped_tracks"] += len(dropped)
        for t in dropped:
            print(f"[{self.name}] track {t.label} dropped at {msg.pts_ns / 1e9:.2f} s", flush=True)
        h, w = msg.image.shape[:2]
        yield "tracks", VisionUpdate(
            stream="tracks", pts_ns=msg.pts_ns, labels=[t.label for t in tracks],
            track_ids=[t.track_id for t in tracks],
            boxes=np.array([t.box for t in tracks], np.float32).reshape(-1, 4),
            arrays={"class_ids": np.array([t.class_id for t in tracks], np.int64),
                    "scores": np.array([t.score for t in tracks], np.float32),
                    "missed": np.array([t.missed for t in tracks], np.int64)},
            info={"dropped": [t.label for t in dropped], "frame_size": [w, h]})

    def report(self) -> dict[str, Any]:
        """Every track seen: class and the spans (seconds of video) where it was detected."""
        tracks = [*getattr(self.tracker, "finished", []), *getattr(self.tracker, "tracks", [])]
        return {t.label: {"class": self.classes[t.class_id], "track_id": t.track_id,
                          "spans": t.spans, "dropped": t in self.tracker.finished}
                for t in sorted(tracks, key=lambda t: t.track_id)}

    def stop(self) -> None:
        """Write the track report (when asked for) and release the session."""
        if self.report_path and self.session is not None:
            Path(self.report_path).write_text(json.dumps(self.report(), indent=1))
        self.session = None
