"""STFT node: mono AudioChunks in, SpecFrames out, one models.spectral.StreamingSTFT per stream.

Frames equal models.spectral.stft() of the whole stream. They leave in blocks of ``block`` frames
(the last block of a stream may be shorter). A gap in ``sample_index`` (lost chunks) is filled
with zeros and counted in ``counters["gap_samples"]``, so frame indices stay on the media clock.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.messages import AudioChunk, EndOfStream, Message, SpecFrames
from engine.node import Node, Outputs
from models.spectral import SAMPLE_RATE, StreamingSTFT


class _State:
    def __init__(self) -> None:
        self.stft = StreamingSTFT()
        self.pending: list[np.ndarray] = []  # complex64 (512, t) columns not yet sent
        self.n_pending = 0
        self.next_frame = 0  # index of the first pending column
        self.next_sample = 0


class STFT(Node):
    """Streaming STFT, ``block`` frames per SpecFrames message."""

    inputs = {"audio": "pull"}
    outputs = {"spec": "push"}

    def __init__(self, *, block: int = 4, threads: int = 1) -> None:
        super().__init__()
        if block < 1:
            raise ValueError(f"block must be >= 1 frame, got {block}")
        self.block = block
        self.threads = threads
        self.streams: dict[str, _State] = {}

    def start(self) -> None:
        """One torch thread: a few frames per call cost ~0.04 ms on one thread but ~20 ms when
        several node processes spin thread pools on the same cores."""
        torch.set_num_threads(self.threads)

    def _emit(self, stream: str, st: _State, final: bool) -> Outputs:
        while st.n_pending >= self.block or (final and st.n_pending > 0):
            cols = np.concatenate(st.pending, axis=1) if len(st.pending) > 1 else st.pending[0]
            n = min(self.block, cols.shape[1])
            yield "spec", SpecFrames(stream=stream, frame_index=st.next_frame,
                                     spec=np.ascontiguousarray(cols[:, :n]))
            rest = cols[:, n:]
            st.pending = [rest] if rest.shape[1] else []
            st.n_pending = rest.shape[1]
            st.next_frame += n

    def _push(self, st: _State, samples: np.ndarray) -> None:
        cols = st.stft.push(samples).numpy().astype(np.complex64, copy=False)  # (512, t_new)
        if cols.shape[1]:
            st.pending.append(cols)
            st.n_pending += cols.shape[1]

    def handle(self, port: str, msg: Message) -> Outputs:
        """AudioChunk (n,) -> SpecFrames (512, block); EndOfStream -> last frames + the EOS."""
        if isinstance(msg, AudioChunk):
            if msg.sample_rate != SAMPLE_RATE:
                raise ValueError(f"stream {msg.stream!r} has sample_rate {msg.sample_rate}; the "
                                 f"STFT expects {SAMPLE_RATE} (resample in the source)")
            st = self.streams.setdefault(msg.stream, _State())
            if msg.sample_index > st.next_sample:
                missing = msg.sample_index - st.next_sample
                self.counters["gap_samples"] += missing
                self._push(st, np.zeros(missing, np.float32))
            elif msg.sample_index < st.next_sample:
                raise ValueError(f"stream {msg.stream!r} went back from sample {st.next_sample} "
                                 f"to {msg.sample_index}")
            self._push(st, msg.samples)
            st.next_sample = msg.sample_index + len(msg.samples)
            yield from self._emit(msg.stream, st, final=False)
        elif isinstance(msg, EndOfStream):
            st = self.streams.pop(msg.stream, None)
            if st is not None:
                cols = st.stft.flush().numpy().astype(np.complex64, copy=False)
                if cols.shape[1]:
                    st.pending.append(cols)
                    st.n_pending += cols.shape[1]
                yield from self._emit(msg.stream, st, final=True)
                # The stream's length lets overlap-add trim its output to the input's length.
                yield "spec", EndOfStream(stream=msg.stream, reason=msg.reason,
                                          time=st.next_sample)
            else:
                yield "spec", msg

    def finish(self) -> Outputs:
        """Streams that never got their EndOfStream end here."""
        for stream in list(self.streams):
            yield from self.handle("audio", EndOfStream(stream=stream, reason="finished"))
