"""Detector node: the bundle's ONNX detector runs every ``detect_every_s`` of video, an IoU +
class tracker turns detections into stable tracks (``violin#1``), and every ``interval_s`` the
tracks go out as one update.

The tracker matches a detection to a track of the same class by greedy highest IoU. An
unmatched detection opens a *tentative* track; it becomes a real track (numbered per class from
1, never reused) once detected ``min_hits`` times in a row, and is forgotten if missed before
that: a class the detector sees on one frame only (a player half-turned, read as a horn for a
moment) opens no output. A real track missed for ``max_missed_s`` is dropped and reported
(``info["dropped"]``); until then it keeps its last box, so one bad frame does not make an
output flicker.

Each track keeps its last detections (time, box): the update carries them, so the motion node
can pool the object feature over crops cut each at its own detection, as the training cache
does, rather than from one frame (one poor box on the first frame gave a feature at cosine 0.49
to the cached one and a separated output 30 dB worse; three detections pooled, 0.84 and full
quality). The first update waits for ``min_hits`` detections for the same reason.

Before tracking, detections of *different* classes on one object (IoU >= ``class_iou_threshold``)
keep only the highest score: the detector's NMS is per class, so one player otherwise comes back
as flute + violin + horn on the same box, each opening a track and a separated output that all
carry the same source (or, on a neighbour's box, the neighbour's sound under the wrong class).
Likewise a box of the *same* class lying mostly inside a better one (``NESTED_COVER``) is
dropped: a second peak on one player would open a second track of its class.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.messages import EndOfStream, Message, VideoFrame, VisionUpdate
from engine.node import Node, Outputs
from models.boxes import box_cover, box_iou

DEVICES = ("auto", "cpu", "cuda")
# A same-class box this much inside a better one is the same player: the heatmap can peak
# twice on one object (a saxophone glyph wider than its player gave a second, narrower box,
# IoU ~0.5 but 97 % inside, that opened a saxophone#2 carrying part of the first's sound).
NESTED_COVER = 0.8


def suppress_duplicates(boxes: np.ndarray, class_ids: np.ndarray, scores: np.ndarray,
                        iou_threshold: float, nested: float = NESTED_COVER) -> np.ndarray:
    """Indices of the detections (boxes (K, 4), class_ids (K,), scores (K,)) that survive a
    class-agnostic NMS at ``iou_threshold`` and, within a class, the removal of boxes lying
    inside a better one (``nested`` of the smaller box covered), best score first ->
    (K',) int64."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order.tolist():
        if keep and box_iou(boxes[keep], boxes[i:i + 1]).max() >= iou_threshold:
            continue
        same = [k for k in keep if class_ids[k] == class_ids[i]]
        if same and box_cover(boxes[same], boxes[i:i + 1]).max() >= nested:
            continue
        keep.append(i)
    return np.array(keep, np.int64)


@dataclass(eq=False)  # identity: two tracks are never "equal"
class Track:
    """One tracked instrument (``track_id`` 0 and ``label`` "" while tentative)."""

    track_id: int
    class_id: int
    label: str
    box: np.ndarray
    score: float
    missed: int = 0
    hits: int = 1  # detections in a row (while tentative), then in all
    spans: list[list[float]] = field(default_factory=list)  # [first_s, last_s] while seen
    history: deque = field(default_factory=deque)  # (time_s, box) of its last detections


class IoUTracker:
    """Greedy IoU + class tracker with tentative tracks and stable, per-class numbered labels."""

    def __init__(self, classes: list[str], *, iou_threshold: float = 0.3,
                 max_missed: int = 3, min_hits: int = 1, history: int = 8) -> None:
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        if max_missed < 1:
            raise ValueError(f"max_missed must be >= 1 update, got {max_missed}")
        if min_hits < 1:
            raise ValueError(f"min_hits must be >= 1 detection, got {min_hits}")
        if history < 1:
            raise ValueError(f"history must be >= 1 detection, got {history}")
        self.classes = classes
        self.iou_threshold, self.max_missed = iou_threshold, max_missed
        self.min_hits, self.history = min_hits, history
        self.tracks: list[Track] = []  # tentative and confirmed
        self.finished: list[Track] = []  # dropped tracks, for the report
        self._next_id = 1
        self._per_class: dict[int, int] = {}

    def _confirm(self, t: Track) -> None:
        n = self._per_class[t.class_id] = self._per_class.get(t.class_id, 0) + 1
        t.track_id, t.label = self._next_id, f"{self.classes[t.class_id]}#{n}"
        self._next_id += 1

    def update(self, boxes: np.ndarray, class_ids: np.ndarray, scores: np.ndarray,
               time_s: float) -> tuple[list[Track], list[Track]]:
        """Detections boxes (K, 4), class_ids (K,), scores (K,) at ``time_s`` ->
        (confirmed tracks in id order, tracks dropped by this update)."""
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
                t.hits += 1
                t.history.append((time_s, t.box))
                if seen_before:
                    t.spans[-1][1] = time_s
                else:
                    t.spans.append([time_s, time_s])
                matched_tracks.add(cands[ti])
                matched_dets.add(d)
                iou[ti, :] = -1.0
                iou[:, di] = -1.0
        dropped, forgotten = [], []
        for i, t in enumerate(self.tracks):
            if i not in matched_tracks:
                t.missed += 1
                if not t.track_id:
                    forgotten.append(t)  # tentative: it had to be seen again
                elif t.missed >= self.max_missed:
                    dropped.append(t)
        for d in range(len(class_ids)):
            if d in matched_dets:
                continue
            t = Track(0, int(class_ids[d]), "", boxes[d].copy(), float(scores[d]),
                      spans=[[time_s, time_s]], history=deque(maxlen=self.history))
            t.history.append((time_s, t.box))
            self.tracks.append(t)
        self.tracks = [t for t in self.tracks if t not in dropped and t not in forgotten]
        for t in self.tracks:  # numbered in the order they were first seen
            if not t.track_id and t.hits >= self.min_hits:
                self._confirm(t)
        self.finished.extend(dropped)
        confirmed = [t for t in self.tracks if t.track_id]
        return sorted(confirmed, key=lambda t: t.track_id), dropped


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
    """VideoFrames in; a tracks VisionUpdate out every ``interval_s`` of video time, and at
    once when a track is confirmed that the last update did not carry (a player who comes into
    view gets an output from that detection on, not up to ``interval_s`` later).

    The update has ``labels`` ("violin#1"), ``track_ids``, ``boxes`` (N, 4) in the frame's
    pixels and ``arrays`` "class_ids" (N,) int64, "scores" (N,), "missed" (N,) int64 (latest
    detections in a row without this track), "history_boxes" (N, H, 4) float32 and
    "history_pts" (N, H) int64: each track's last ``history`` detections, oldest first, padded
    at the front with pts -1. ``info["dropped"]`` lists the labels dropped since the last update.
    ``input_size`` (pixels of the longer side) resizes frames for the detector; boxes come back
    in frame pixels. ``class_iou_threshold``: detections of other classes overlapping a better
    one this much are dropped (one object, one class; 1.0 keeps only identical boxes apart).
    ``detect_every_s`` 0 runs the detector on every frame.
    """

    inputs = {"video": "pull"}
    outputs = {"tracks": "push"}

    def __init__(self, *, bundle: str, interval_s: float = 1.0, detect_every_s: float = 0.25,
                 score_threshold: float | None = None,
                 iou_threshold: float = 0.3, class_iou_threshold: float = 0.5,
                 min_hits: int = 2, max_missed_s: float = 3.0, history: int = 8,
                 input_size: int | None = None, device: str = "auto",
                 threads: int = 1, report_path: str | None = None) -> None:
        super().__init__()
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        if detect_every_s < 0:
            raise ValueError(f"detect_every_s must be >= 0, got {detect_every_s}")
        if max_missed_s <= 0:
            raise ValueError(f"max_missed_s must be > 0, got {max_missed_s}")
        # Never detect less often than updates go out.
        self.detect_every_s = min(detect_every_s, interval_s)
        self.min_hits, self.max_missed_s, self.history = min_hits, max_missed_s, history
        if device not in DEVICES:
            raise ValueError(f"device {device!r}; allowed: {list(DEVICES)}")
        if not 0.0 < class_iou_threshold <= 1.0:
            raise ValueError(f"class_iou_threshold must be in (0, 1], got {class_iou_threshold}")
        self.class_iou_threshold = class_iou_threshold
        self.bundle_path, self.interval_s = bundle, interval_s
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.input_size, self.device = input_size, device
        self.threads, self.report_path = threads, report_path
        self.session: Any = None
        self._last_ns: int | None = None  # last update sent
        self._last_detect_ns: int | None = None
        self._detections = 0
        self._dropped: list[str] = []  # labels dropped since the last update went out
        self._sent_ids: set[int] = set()  # the tracks the last update carried

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
        # Misses are counted in detections: max_missed_s of them drop a track.
        per_s = 1.0 / self.detect_every_s if self.detect_every_s > 0 else 8.0
        self.tracker = IoUTracker(self.classes, iou_threshold=self.iou_threshold,
                                  max_missed=max(1, math.ceil(self.max_missed_s * per_s)),
                                  min_hits=self.min_hits, history=self.history)

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
        best = suppress_duplicates(boxes, class_ids, scores, self.class_iou_threshold)
        self.counters["duplicates_suppressed"] += len(keep) - len(best)
        return boxes[best].astype(np.float32), class_ids[best], scores[best].astype(np.float32)

    def handle(self, port: str, msg: Message) -> Outputs:
        """A VideoFrame due for detection -> detect + track; when an update is due, the
        confirmed tracks as a VisionUpdate. EndOfStream passed on."""
        if isinstance(msg, EndOfStream):
            yield "tracks", EndOfStream(stream="tracks", reason=msg.reason, time=msg.time)
            return
        if not isinstance(msg, VideoFrame):
            return
        # Half a frame of slack: frame instants rarely land exactly on the interval.
        if (self._last_detect_ns is not None
                and msg.pts_ns - self._last_detect_ns < self.detect_every_s * 1e9 * 0.95):
            return
        self._last_detect_ns = msg.pts_ns
        boxes, class_ids, scores = self.detect(np.asarray(msg.image))
        tracks, dropped = self.tracker.update(boxes, class_ids, scores, msg.pts_ns / 1e9)
        self._detections += 1
        self.counters["detections"] += 1
        self.counters["dropped_tracks"] += len(dropped)
        for t in dropped:
            print(f"[{self.name}] track {t.label} dropped at {msg.pts_ns / 1e9:.2f} s", flush=True)
        self._dropped += [t.label for t in dropped]  # detections between updates drop too
        ids = {t.track_id for t in tracks}
        if self._last_ns is None:
            if self._detections < self.min_hits:  # a track needs min_hits detections first
                return
        elif (msg.pts_ns - self._last_ns < self.interval_s * 1e9 * 0.95
              and ids <= self._sent_ids):
            return
        self._last_ns = msg.pts_ns
        self._sent_ids = ids
        self.counters["updates"] += 1
        yield "tracks", self.tracks_update(msg, tracks, self._dropped)
        self._dropped = []

    def tracks_update(self, frame: VideoFrame, tracks: list[Track],
                      dropped: list[str]) -> VisionUpdate:
        """The confirmed tracks at ``frame`` as a VisionUpdate (see the class docstring)."""
        n, h = len(tracks), self.history
        hist_boxes = np.zeros((n, h, 4), np.float32)
        hist_pts = np.full((n, h), -1, np.int64)
        for i, t in enumerate(tracks):
            for j, (ts, box) in enumerate(t.history, start=h - len(t.history)):
                hist_boxes[i, j], hist_pts[i, j] = box, round(ts * 1e9)
        height, width = frame.image.shape[:2]
        return VisionUpdate(
            stream="tracks", pts_ns=frame.pts_ns, labels=[t.label for t in tracks],
            track_ids=[t.track_id for t in tracks],
            boxes=np.array([t.box for t in tracks], np.float32).reshape(-1, 4),
            arrays={"class_ids": np.array([t.class_id for t in tracks], np.int64),
                    "scores": np.array([t.score for t in tracks], np.float32),
                    "missed": np.array([t.missed for t in tracks], np.int64),
                    "history_boxes": hist_boxes, "history_pts": hist_pts},
            info={"dropped": list(dropped), "frame_size": [width, height]})

    def report(self) -> dict[str, Any]:
        """Every track seen: class and the spans (seconds of video) where it was detected."""
        tracks = [*getattr(self.tracker, "finished", []), *getattr(self.tracker, "tracks", [])]
        tracks = [t for t in tracks if t.track_id]  # tentative tracks never became outputs
        return {t.label: {"class": self.classes[t.class_id], "track_id": t.track_id,
                          "spans": t.spans, "dropped": t in self.tracker.finished}
                for t in sorted(tracks, key=lambda t: t.track_id)}

    def stop(self) -> None:
        """Write the track report (when asked for) and release the session."""
        if self.report_path and self.session is not None:
            Path(self.report_path).write_text(json.dumps(self.report(), indent=1))
        self.session = None
