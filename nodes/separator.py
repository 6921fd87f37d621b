"""Model separator node: STFT frames + vision updates in, per-instrument masks out.

The query cache: a VisionUpdate (tracks with object features and motion tokens) is turned into
visually named, motion-decoded queries by ``IQuery.encode_visual`` once; per audio step only
the audio network and the audio-aware decoder run (``IQuery.separate``), for every tracked
instrument in one pass. The step schedule (window, block, lookahead, zero padding at both ends)
and the blend of every step's estimate of a frame (``Blend``, with ``blend``: run_engine's file
schedule) are ``models.streaming``, which is also the offline reference (``sliding_masks``).

* ``sync_vision`` (files): a step waits until vision has reached its media time (or vision has
  ended, or ``vision_wait_s`` of wall time passed without vision progress), then uses the newest
  update at or before it; the output of a file then does not depend on process timing. Live:
  the latest update wins and audio never waits for vision.
* No instrument tracked: counted (``no_instrument_steps``), logged when it starts and ends, and
  a Masks message with no labels is sent (outputs that were open fade out and close). With
  ``fallback`` ("all" or class names), the learned class queries of those classes are used
  instead, labelled by class name.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.messages import EndOfStream, Masks, Message, SpecFrames, VisionUpdate
from engine.node import Node, Outputs
from models.iquery import QueryCache
from models.spectral import HOP, N_BINS, SAMPLE_RATE
from models.streaming import Blend, check_window, step_masks, step_window, window_start

BACKENDS = ("torch", "onnx")


@dataclass
class QueryState:
    """The cached queries of one vision update (or of the fallback classes)."""

    pts_ns: int
    labels: list[str]
    cache: QueryCache | None  # None when no instrument


@dataclass
class _Stream:
    """Frames of one audio stream: ``buf`` (N_BINS, n) complex holds frames buf_start..;
    ``blend`` holds the estimates of the frames after the last emitted block (None: no blend)."""

    buf: torch.Tensor
    buf_start: int
    blend: Blend | None
    n_frames: int = 0  # frames received
    next_emit: int = 0
    ended: EndOfStream | None = None
    labels: list[str] = field(default_factory=list)  # labels of the last Masks sent


class Separator(Node):
    """SpecFrames (512, t) + VisionUpdates -> Masks (S, 512, block) with the mixture frames."""

    inputs = {"spec": "pull", "vision": "pull"}
    outputs = {"masks": "push"}

    def __init__(self, *, bundle: str, backend: str = "torch", device: str = "auto",
                 block: int | None = None, lookahead: int | None = None,
                 sync_vision: bool = False, vision_wait_s: float = 30.0,
                 fallback: list[str] | str | None = None, threads: int = 1,
                 onnx_path: str | None = None, report_path: str | None = None,
                 blend: bool = False) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}; allowed: {list(BACKENDS)}")
        self.bundle_path, self.backend, self.device = bundle, backend, device
        self.block, self.lookahead, self.blend = block, lookahead, blend
        self.sync_vision, self.vision_wait_s = sync_vision, vision_wait_s
        self.fallback = [fallback] if isinstance(fallback, str) else list(fallback or [])
        self.threads, self.onnx_path, self.report_path = threads, onnx_path, report_path
        self.providers: list[str] | None = None  # onnxruntime's, for the onnx backend
        if sync_vision:
            self.tick_interval = 0.05  # the vision wait's timeout needs a clock
        self.streams: dict[str, _Stream] = {}
        self.states: list[QueryState] = []  # sync mode: every update still needed; else latest
        self.vision_ended = False
        self._vision_progress = time.monotonic()
        self._no_instrument = False
        self.spans: dict[str, list[list[float]]] = {}

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load the separator (torch or onnxruntime) and build the fallback queries."""
        from nodes.bundle import load_bundle
        from nodes.motion import pick_device

        torch.set_num_threads(self.threads)
        bundle = load_bundle(self.bundle_path)
        self.classes = bundle.classes
        self.dev = pick_device(self.device)
        self.model = bundle.load_separator(self.dev)
        self.window = self.model.n_frames
        self.block = self.block or bundle.stream["block"]
        self.lookahead = bundle.stream["lookahead"] if self.lookahead is None else self.lookahead
        check_window(self.window, self.block, self.lookahead)
        unknown = [c for c in self.fallback if c != "all" and c not in self.classes]
        if unknown:
            raise ValueError(f"fallback classes {unknown} not in the bundle: {self.classes}")
        if "all" in self.fallback:
            self.fallback = list(self.classes)
        self.fallback_state = self._fallback_state() if self.fallback else None
        self.session = self._onnx_session(bundle) if self.backend == "onnx" else None
        self._vision_progress = self.clock()

    def _onnx_session(self, bundle: Any) -> Any:
        import onnxruntime as ort

        from models.export import export_onnx
        from nodes.detector import onnx_providers

        path = Path(self.onnx_path) if self.onnx_path else bundle.path / "separator.onnx"
        weights = bundle.file("separator").with_suffix(".safetensors")
        if not path.is_file() or path.stat().st_mtime < weights.stat().st_mtime:
            if not os.access(path.parent, os.W_OK):  # a read-only bundle: export elsewhere
                path = Path(tempfile.gettempdir()) / f"iq-separator-{os.getuid()}.onnx"
            print(f"[{self.name}] exporting the separator to {path}", flush=True)
            export_onnx(self.model.cpu(), path)
            self.model.to(self.dev)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        # The requested device, not torch's pick: "auto" on a GPU machine whose onnxruntime
        # has no CUDA provider runs the session on the CPU rather than refusing to start.
        self.providers = onnx_providers(self.device)
        return ort.InferenceSession(str(path), opts, providers=self.providers)

    def stop(self) -> None:
        """Write the report (output spans, settings) when asked for."""
        if self.report_path and hasattr(self, "window"):
            Path(self.report_path).write_text(json.dumps(self.report(), indent=1))

    def report(self) -> dict[str, Any]:
        """Spans (seconds) where each label was output, and the step settings."""
        return {"spans": self.spans, "window": self.window, "block": self.block,
                "lookahead": self.lookahead, "blend": self.blend, "backend": self.backend,
                "device": self.dev, "onnx_providers": self.providers, "fallback": self.fallback}

    # --------------------------------------------------------------------- query cache
    @torch.no_grad()
    def encode(self, pts_ns: int, labels: list[str], class_ids: np.ndarray,
               obj_feats: np.ndarray, motion: np.ndarray | None) -> QueryState:
        """Tracked instruments -> their cached queries (IQuery.encode_visual, once)."""
        n = len(labels)
        if n == 0:
            return QueryState(pts_ns, [], None)
        m = self.model
        ids = torch.as_tensor(np.asarray(class_ids, np.int64)).view(1, n)
        feats = torch.as_tensor(np.asarray(obj_feats, np.float32)).view(1, n, -1)
        if motion is None:  # no motion tokens: one padded token, attended by nobody
            mot = torch.zeros(1, n, 1, m.motion_proj.in_features)
            mot_pad = torch.ones(1, n, 1, dtype=torch.bool)
        else:
            mot = torch.as_tensor(np.asarray(motion, np.float32))[None]
            mot_pad = torch.zeros(mot.shape[:3], dtype=torch.bool)
        cache = m.encode_visual(feats.to(self.dev), ids.to(self.dev), mot.to(self.dev),
                                mot_pad.to(self.dev), torch.zeros(1, n, dtype=torch.bool,
                                                                  device=self.dev))
        self.counters["cache_encodes"] += 1
        return QueryState(pts_ns, list(labels), cache)

    def _fallback_state(self) -> QueryState:
        ids = np.array([self.classes.index(c) for c in self.fallback], np.int64)
        feats = np.zeros((len(ids), self.model.obj_proj.in_features), np.float32)
        return self.encode(-1, list(self.fallback), ids, feats, None)

    def on_vision(self, msg: VisionUpdate) -> None:
        """A VisionUpdate -> a new query state (the cache is recomputed only here)."""
        n = len(msg.labels)
        arrays = msg.arrays
        class_ids = np.asarray(arrays.get("class_ids", np.zeros(n, np.int64)))
        bad = [int(c) for c in class_ids if not 0 <= int(c) < len(self.classes)]
        if bad or "obj_feats" not in arrays:
            self.counters["bad_vision"] += 1
            print(f"[{self.name}] ignored a vision update: class ids {bad} outside "
                  f"[0, {len(self.classes)}) or no obj_feats", flush=True)
            return
        state = self.encode(msg.pts_ns, list(msg.labels), class_ids, arrays["obj_feats"],
                            arrays.get("motion"))
        self.counters["vision_updates"] += 1
        if self.sync_vision:
            self.states.append(state)
        else:
            self.states = [state]

    # ------------------------------------------------------------------------- stepping
    def _state_for(self, first_frame: int) -> QueryState | None:
        """The query state a step emitting from ``first_frame`` uses."""
        if not self.states:
            return None
        if not self.sync_vision:
            return self.states[-1]
        t_ns = first_frame * HOP * 1e9 / SAMPLE_RATE
        before = [s for s in self.states if s.pts_ns <= t_ns]
        return before[-1] if before else self.states[0]

    def _vision_ready(self, first_frame: int, block: int) -> bool:
        if not self.sync_vision or self.vision_ended:
            return True
        t_ns = (first_frame + block) * HOP * 1e9 / SAMPLE_RATE
        if self.states and self.states[-1].pts_ns >= t_ns:
            return True
        if self.clock() - self._vision_progress > self.vision_wait_s:
            if not self.counters["vision_timeouts"]:
                print(f"[{self.name}] no vision progress for {self.vision_wait_s} s: going on "
                      "without waiting", flush=True)
            self.counters["vision_timeouts"] += 1
            self.vision_ended = True
            return True
        return False

    def _separate_fn(self, cache: QueryCache) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.session is not None:
            q = cache.queries.detach().cpu().numpy().astype(np.float32)
            pad = cache.query_pad.detach().cpu().numpy().astype(bool)

            def run(x: torch.Tensor) -> torch.Tensor:
                out = self.session.run(["masks"], {"x": x.numpy().astype(np.float32),
                                                   "queries": q, "query_pad": pad})[0]
                return torch.from_numpy(out)
            return run

        def run_torch(x: torch.Tensor) -> torch.Tensor:
            return self.model.separate(x.to(self.dev), cache).cpu()
        return run_torch

    @torch.no_grad()
    def _step(self, stream: str, st: _Stream) -> Outputs:
        e, block = st.next_emit, min(self.block, st.n_frames - st.next_emit)
        # Once the stream has ended, its last steps read its last window (no silence after it).
        s, offset = step_window(e, self.window, self.block, self.lookahead,
                                None if st.ended is None else st.n_frames)
        s -= st.buf_start
        win = st.buf[:, s:s + self.window]
        assert win.shape[1] == self.window, f"window of {win.shape[1]} frames at step {e}"
        mixture = st.buf[:, e - st.buf_start:e - st.buf_start + block]
        state = self._state_for(e)
        if self.sync_vision and state is not None:
            del self.states[:self.states.index(state)]  # older updates are never needed again
        if state is None or not state.labels:
            state = self.fallback_state or state
            if state is not None and state is self.fallback_state:
                self.counters["fallback_steps"] += 1
        labels = state.labels if state is not None else []
        if not labels:
            self.counters["no_instrument_steps"] += 1
            if not self._no_instrument:
                print(f"[{self.name}] no instrument detected at {e * HOP / SAMPLE_RATE:.2f} s: "
                      "no output until one is (use --fallback-queries to separate anyway)",
                      flush=True)
            self._no_instrument = True
            masks = np.zeros((0, N_BINS, block), np.float32)
            if st.blend is not None:
                st.blend.reset()
        else:
            if self._no_instrument:
                print(f"[{self.name}] instruments {labels} at {e * HOP / SAMPLE_RATE:.2f} s",
                      flush=True)
            self._no_instrument = False
            t0 = time.perf_counter()
            m = step_masks(self._separate_fn(state.cache), win, self.model.n_rows, self.block,
                           self.lookahead, ahead=st.blend is not None, offset=offset)
            if st.blend is not None:
                m = st.blend(labels, m, offset)  # (Q, N_BINS, self.block)
            self.counters["compute_us"] += int((time.perf_counter() - t0) * 1e6)
            self.counters["steps"] += 1
            masks = np.ascontiguousarray(m[:, :, :block].numpy(), np.float32)
            t_a, t_b = e * HOP / SAMPLE_RATE, (e + block) * HOP / SAMPLE_RATE
            for label in labels:
                spans = self.spans.setdefault(label, [])
                if spans and abs(spans[-1][1] - t_a) < 1e-9:
                    spans[-1][1] = t_b
                else:
                    spans.append([t_a, t_b])
        st.labels = list(labels)
        st.next_emit = e + block
        # Keep only what the next window needs, and the last `window` frames received (an
        # end_window step reads them once the stream ends).
        keep = min(window_start(st.next_emit, self.window, self.block, self.lookahead),
                   st.n_frames - self.window)
        if keep > st.buf_start:
            st.buf = st.buf[:, keep - st.buf_start:]
            st.buf_start = keep
        yield "masks", Masks(stream=stream, frame_index=e, labels=list(labels), masks=masks,
                             mixture=np.ascontiguousarray(mixture.numpy(), np.complex64))

    def _drain(self, stream: str, force: bool = False) -> Outputs:
        """Every step that is possible now; at the stream's end the last ones and the end."""
        st = self.streams[stream]
        while st.next_emit < st.n_frames:
            block = min(self.block, st.n_frames - st.next_emit)
            need = st.next_emit + self.block + self.lookahead  # frames the window must hold
            if st.ended is None and st.buf_start + st.buf.shape[1] < need:
                return
            if not force and not self._vision_ready(st.next_emit, block):
                return
            have = st.buf_start + st.buf.shape[1]
            if have < need:  # the end of the stream: silence after it, as offline
                st.buf = torch.cat([st.buf, torch.zeros(N_BINS, need - have,
                                                        dtype=st.buf.dtype)], 1)
            yield from self._step(stream, st)
        if st.ended is not None:
            del self.streams[stream]
            yield "masks", st.ended

    def handle(self, port: str, msg: Message) -> Outputs:
        """SpecFrames -> Masks when a step is due; VisionUpdate -> new query cache."""
        if port == "vision":
            if isinstance(msg, VisionUpdate):
                self.on_vision(msg)
                self._vision_progress = self.clock()
            elif isinstance(msg, EndOfStream):
                self.vision_ended = True
            for stream in list(self.streams):
                yield from self._drain(stream)
            return
        if isinstance(msg, SpecFrames):
            st = self.streams.get(msg.stream)
            if st is None:
                left = self.window - self.block - self.lookahead  # zeros before frame 0
                st = self.streams[msg.stream] = _Stream(
                    torch.zeros(N_BINS, left, dtype=torch.complex64), -left,
                    Blend(self.window, self.block, self.lookahead) if self.blend else None)
            if msg.frame_index != st.n_frames:
                # overlap_add zero-fills gaps; the window here fills them with silence too.
                missing = msg.frame_index - st.n_frames
                if missing < 0:
                    raise ValueError(f"stream {msg.stream!r} went back from frame "
                                     f"{st.n_frames} to {msg.frame_index}")
                self.counters["gap_frames"] += missing
                st.buf = torch.cat([st.buf, torch.zeros(N_BINS, missing,
                                                        dtype=torch.complex64)], 1)
                st.n_frames += missing
            st.buf = torch.cat([st.buf, torch.from_numpy(np.array(msg.spec, np.complex64))], 1)
            st.n_frames += msg.spec.shape[1]
            yield from self._drain(msg.stream)
        elif isinstance(msg, EndOfStream):
            if msg.stream in self.streams:
                self.streams[msg.stream].ended = msg
                yield from self._drain(msg.stream)
            else:
                yield "masks", msg

    def tick(self) -> Outputs:
        """Sync mode: steps held for vision go once vision arrives or times out."""
        for stream in list(self.streams):
            yield from self._drain(stream)

    def finish(self) -> Outputs:
        """Inputs ended: everything held is separated with the last vision."""
        self.vision_ended = True
        for stream in list(self.streams):
            st = self.streams[stream]
            if st.ended is None:
                st.ended = EndOfStream(stream=stream, reason="finished")
            yield from self._drain(stream, force=True)
