"""Overlap-add node: Masks (with their mixture frames) in, one AudioChunk stream per label out.

Contract: a Masks message carries ``masks`` (S, 512, t), already unwarped to 512 bins, and the
``mixture`` STFT frames (512, t) they apply to; label s is resynthesised as
``StreamingISTFT(masks[s] * mixture)`` (mixture magnitude times mask, mixture phase). One
StreamingISTFT per (stream, label) keeps its state across messages, so streamed output equals
offline istft of the same frames. Output stream ids are the labels ("violin#1").

* A label first seen at frame f starts there: its first sample is ``sample_index = f * HOP``.
* A label missing from a Masks message of its stream is faded out (frames of zeros until every
  sample it touches is final), flushed and closed with ``EndOfStream(label, reason="gone")``.
* ``EndOfStream(stream)`` flushes every label of that stream; its ``time`` (the stream's length
  in samples, set by the STFT node) trims the tail, then each label gets its EndOfStream.
* A jump in ``frame_index`` (lost messages) is filled with zero frames and counted
  (``counters["gap_frames"]``), keeping outputs on the media clock.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.messages import AudioChunk, EndOfStream, Masks, Message
from engine.node import Node, Outputs
from models.spectral import HOP, N_BINS, N_FFT, SAMPLE_RATE, StreamingISTFT

_FADE_FRAMES = -(-N_FFT // HOP)  # zero frames after which no sample depends on a real frame


class _Label:
    def __init__(self, first_frame: int) -> None:
        self.istft = StreamingISTFT()
        self.next_frame = first_frame
        self.next_sample = first_frame * HOP


class OverlapAdd(Node):
    """Per-label inverse STFT with state across messages."""

    inputs = {"masks": "pull"}
    outputs = {"audio": "push"}

    def __init__(self, *, threads: int = 1) -> None:
        super().__init__()
        self.threads = threads
        self.labels: dict[str, dict[str, _Label]] = {}  # stream -> label -> state

    def start(self) -> None:
        """One torch thread (see nodes.stft.STFT.start: small ops lose to thread contention)."""
        torch.set_num_threads(self.threads)

    def _chunk(self, label: str, st: _Label, samples: torch.Tensor,
               limit: int | None = None) -> Outputs:
        x = samples.numpy().astype(np.float32, copy=False)
        if limit is not None:
            x = x[: max(0, limit - st.next_sample)]
        if x.size:
            yield "audio", AudioChunk(stream=label, sample_index=st.next_sample, samples=x,
                                      sample_rate=SAMPLE_RATE)
            st.next_sample += x.size

    def _close(self, label: str, st: _Label, reason: str, limit: int | None) -> Outputs:
        if reason == "gone":
            yield from self._chunk(label, st, st.istft.push(
                torch.zeros(N_BINS, _FADE_FRAMES, dtype=torch.complex64)), limit)
        yield from self._chunk(label, st, st.istft.flush(), limit)
        yield "audio", EndOfStream(stream=label, reason=reason, time=st.next_sample)

    def handle(self, port: str, msg: Message) -> Outputs:
        """Masks (S, 512, t) -> AudioChunks per label; EndOfStream -> flush and close."""
        if isinstance(msg, Masks):
            s, f, t = msg.masks.shape
            if f != N_BINS or msg.mixture.shape != (N_BINS, t) or len(msg.labels) != s:
                raise ValueError(
                    f"Masks of stream {msg.stream!r}: masks {msg.masks.shape}, mixture "
                    f"{msg.mixture.shape}, {len(msg.labels)} labels; expected (S, {N_BINS}, t), "
                    f"({N_BINS}, t) and S labels"
                )
            labels = self.labels.setdefault(msg.stream, {})
            for gone in [lb for lb in labels if lb not in msg.labels]:
                yield from self._close(gone, labels.pop(gone), "gone", None)
            mixture = torch.from_numpy(np.array(msg.mixture))
            masks = torch.from_numpy(np.array(msg.masks))
            for i, label in enumerate(msg.labels):
                st = labels.get(label)
                if st is None:
                    st = labels[label] = _Label(msg.frame_index)
                if msg.frame_index < st.next_frame:
                    raise ValueError(f"stream {msg.stream!r} label {label!r}: frame "
                                     f"{msg.frame_index} repeats (next is {st.next_frame})")
                if msg.frame_index > st.next_frame:
                    missing = msg.frame_index - st.next_frame
                    self.counters["gap_frames"] += missing
                    yield from self._chunk(label, st, st.istft.push(
                        torch.zeros(N_BINS, missing, dtype=torch.complex64)))
                yield from self._chunk(label, st, st.istft.push(masks[i] * mixture))
                st.next_frame = msg.frame_index + t
        elif isinstance(msg, EndOfStream):
            limit = msg.time if msg.time >= 0 else None
            for label, st in self.labels.pop(msg.stream, {}).items():
                yield from self._close(label, st, msg.reason, limit)

    def finish(self) -> Outputs:
        """Close every label still open (its source stream never sent EndOfStream)."""
        for stream in list(self.labels):
            yield from self.handle("masks", EndOfStream(stream=stream, reason="finished"))
