"""Motion node: for every tracks update of the detector, each track becomes an object feature and
motion tokens (models/features.py, the same code as the training feature cache), sent on as one
VisionUpdate for the separator.

The object feature pools ``obj_frames`` crops spread over the track's recent detections
(``history_boxes`` / ``history_pts`` of the detector's update), each cut from the frame of that
detection with that detection's own box: the training cache pools ``obj_frames`` frames spread
over the clip, each with its own box, and one box applied to frames from before it was detected
cuts a moving player badly (measured: cosine to the cached feature 0.55-0.8 on such updates,
0.95-1.0 with per-detection crops). An update without a history (another detector node) pools
the crop of its own frame. The motion tokens come from the crop tube of the last
``tube_frames`` frames of a ring buffer, at the current box.

Features are computed at the tracks update's own media time from the frames at or before it,
so a file gives the same features however fast its frames and tracks arrive; a tracks update
waits (queued) until a frame at or after its time is in the ring, or the video has ended.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from engine.messages import EndOfStream, Message, VideoFrame, VisionUpdate
from engine.node import Node, Outputs

MAX_RING_S = 30.0  # frames kept while tracks lag behind (a detector still loading its model)
HISTORY_S = 4.0  # frames kept before the next update for its detection history


def pick_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cpu"/"cuda" as given."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}; allowed: ['auto', 'cpu', 'cuda']")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Motion(Node):
    """VideoFrames + tracks VisionUpdates in; per-track features out.

    Output VisionUpdate (stream "vision"): the tracks' ``labels``, ``track_ids``, ``boxes`` and
    ``arrays`` "class_ids" (N,) int64, "obj_feats" (N, obj_dim) float32, "motion"
    (N, Tm, motion_dim) float32.
    """

    inputs = {"video": "pull", "tracks": "pull"}
    outputs = {"vision": "push"}

    def __init__(self, *, bundle: str, device: str = "auto", threads: int = 1) -> None:
        super().__init__()
        self.bundle_path, self.device, self.threads = bundle, device, threads
        self.ring: deque[tuple[int, np.ndarray]] = deque()
        self.pending: deque[VisionUpdate] = deque()
        self.video_ended = False
        self._last_pts = 0  # media time of the newest tracks update

    def start(self) -> None:
        """Load the two visual encoders of the bundle."""
        import torch

        from nodes.bundle import load_bundle

        torch.set_num_threads(self.threads)
        bundle = load_bundle(self.bundle_path)
        self.visual = bundle.visual
        dev = pick_device(self.device)
        self.obj_encoder = bundle.load_object_encoder(dev)
        self.motion_encoder = bundle.load_motion_encoder(dev)
        self.step_ns = int(round(1e9 / self.visual["fps"]))

    def tube(self, pts_ns: int) -> np.ndarray:
        """The last ``tube_frames`` frames at or before ``pts_ns`` -> (T, H, W, 3) uint8.

        Fewer frames (the start of a stream, dropped frames) are padded by repeating the oldest,
        so the tube always has the length the encoders were trained on.
        """
        n = self.visual["tube_frames"]
        frames = [img for t, img in self.ring if t <= pts_ns][-n:]
        if not frames:  # tracks from before the first frame we hold: use the oldest
            frames = [self.ring[0][1]]
        frames = [frames[0]] * (n - len(frames)) + frames
        return np.stack(frames)

    def frame_at(self, pts_ns: int) -> np.ndarray:
        """The ring's frame at ``pts_ns`` (the newest one at or before it; else the oldest)."""
        best = self.ring[0][1]
        for t, img in self.ring:
            if t > pts_ns:
                break
            best = img
        return best

    def object_crops(self, update: VisionUpdate, i: int) -> np.ndarray:
        """Track ``i`` of ``update`` -> (k, S, S, 3) uint8: crops at up to ``obj_frames``
        of its recent detections, spread evenly, each from its own frame and box."""
        from models.features import crop_image

        pts = update.arrays.get("history_pts")
        if pts is None:
            shots = [(update.pts_ns, update.boxes[i])]
        else:
            have = np.flatnonzero(np.asarray(pts[i]) >= 0)
            shots = [(int(pts[i][j]), update.arrays["history_boxes"][i][j]) for j in have]
            shots = shots or [(update.pts_ns, update.boxes[i])]
        pick = np.linspace(0, len(shots) - 1, min(self.visual["obj_frames"], len(shots)))
        return np.stack([crop_image(self.frame_at(shots[j][0]), shots[j][1],
                                    self.visual["obj_crop"], self.visual["obj_margin"])
                         for j in np.unique(pick.round().astype(int))])

    def features(self, update: VisionUpdate) -> VisionUpdate:
        """Tracks update -> the same tracks with object features and motion tokens."""
        from models.features import crop_boxes, motion_tokens, normalise, object_feature

        n = len(update.labels)
        obj_dim = self.obj_encoder.kwargs["obj_dim"]
        motion_dim = self.motion_encoder.kwargs["motion_dim"]
        feats = np.zeros((n, obj_dim), np.float32)
        tokens: list[np.ndarray] = []
        frames = self.tube(update.pts_ns)
        for i in range(n):
            feats[i] = object_feature(self.obj_encoder, normalise(self.object_crops(update, i)),
                                      self.visual["obj_frames"]).numpy()
            boxes = np.repeat(np.asarray(update.boxes[i:i + 1], np.float32), len(frames), 0)
            mot = crop_boxes(frames, boxes, self.visual["motion_crop"],
                             self.visual["motion_margin"])
            tokens.append(motion_tokens(self.motion_encoder, mot).numpy())
        motion = np.stack(tokens).astype(np.float32) if tokens else np.zeros((0, 1, motion_dim),
                                                                             np.float32)
        self.counters["updates"] += 1
        self.counters["tracks"] += n
        return VisionUpdate(
            stream="vision", pts_ns=update.pts_ns, labels=list(update.labels),
            track_ids=list(update.track_ids), boxes=np.asarray(update.boxes, np.float32),
            arrays={"class_ids": np.asarray(update.arrays.get("class_ids", np.zeros(n)),
                                            np.int64),
                    "obj_feats": feats, "motion": motion},
            info=dict(update.info))

    def _ready(self) -> Outputs:
        while self.pending and self.ring and (self.video_ended
                                              or self.ring[-1][0] >= self.pending[0].pts_ns):
            yield "vision", self.features(self.pending.popleft())
        # Frames older than the oldest tube any later update can ask for are not needed.
        keep_from = (self.pending[0].pts_ns if self.pending else self._last_pts) \
            - max(self.visual["tube_frames"] * self.step_ns, int(HISTORY_S * 1e9))
        while len(self.ring) > 1 and self.ring[0][0] < keep_from:
            self.ring.popleft()

    def handle(self, port: str, msg: Message) -> Outputs:
        """Frames fill the ring; a tracks update becomes a features update when its frames
        are there."""
        if port == "video" and isinstance(msg, VideoFrame):
            self.ring.append((msg.pts_ns, np.asarray(msg.image)))
            while self.ring[-1][0] - self.ring[0][0] > MAX_RING_S * 1e9:
                self.ring.popleft()
                self.counters["ring_overflow"] += 1
        elif port == "video" and isinstance(msg, EndOfStream):
            self.video_ended = True
        elif port == "tracks" and isinstance(msg, VisionUpdate):
            self.pending.append(msg)
            self._last_pts = msg.pts_ns
        yield from self._ready()

    def finish(self) -> Outputs:
        """Updates still waiting for frames use what the ring holds; then the end of vision."""
        self.video_ended = True
        if self.ring:
            yield from self._ready()
        self.counters["updates_without_frames"] += len(self.pending)
        yield "vision", EndOfStream(stream="vision", reason="finished")

    def stop(self) -> None:
        """Drop the encoders and frames."""
        self.ring.clear()
        self.obj_encoder = self.motion_encoder = None
