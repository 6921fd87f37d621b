"""Sliding-window mask prediction: the window bookkeeping shared by the live separator node and
offline evaluation, so that "streamed equals offline" is a property of one piece of code.

A step emits ``block`` frames ``[e, e + block)``. Its window holds ``window`` frames ending
``lookahead`` frames after the newest emitted one: ``[e + block + lookahead - window,
e + block + lookahead)``. Frames before 0 are zero (silence), live and offline alike; so are the
frames after the end of a stream shorter than a window.

At the end of a stream at least ``window`` frames long, the steps whose window would reach past
the last frame read the last ``window`` frames instead (``end_window``): their blocks sit later in
the window than usual, but they see no invented silence. Zero frames after the end cost the last
1.5 s of a clip 2.5 dB (60 val pairs, the shipped separator, 16:24: docs/RESULTS.md section 36),
where offline separation (training.separate) aligns its last window with the clip's end too.

Each step also estimates the ``lookahead`` frames after its block, which the next steps emit.
``Blend`` keeps those estimates and emits each frame as the triangle-weighted mean of every
window's estimate of it, as offline separation (training.separate) averages its overlapping
windows: no step and no latency is added, only the estimates already computed are used. It
helps a schedule whose block sits mid-window (the files' 16:24 of a 64-frame window: +0.15 dB)
and hurts one whose block sits at the window's edge (the live 2:4: -0.10 dB, since the earlier
windows saw those frames with even less future), so the engine blends for files only
(docs/RESULTS.md section 35).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.spectral import N_BINS, model_input, unwarp

# (x (1, 1, n_rows, window) log-magnitude window) -> warped masks (1, Q, n_rows, window)
SeparateFn = Callable[[Tensor], Tensor]


def check_window(window: int, block: int, lookahead: int) -> None:
    """Raise ValueError unless 1 <= block, 0 <= lookahead and block + lookahead <= window."""
    if block < 1 or lookahead < 0 or block + lookahead > window:
        raise ValueError(f"need block >= 1, lookahead >= 0 and block + lookahead <= window; got "
                         f"window {window}, block {block}, lookahead {lookahead}")


def window_start(first_emitted: int, window: int, block: int, lookahead: int) -> int:
    """Index of the first frame of the window of the step that emits ``first_emitted``."""
    return first_emitted + block + lookahead - window


def end_window(first_emitted: int, n_frames: int, window: int, block: int,
               lookahead: int) -> int | None:
    """Start of the window of a step at the end of a stream of ``n_frames`` frames: the last
    ``window`` frames, when the usual window would reach past the end and the stream is at
    least a window long; None otherwise (the usual window, zeros after the end)."""
    if n_frames < window or first_emitted + block + lookahead <= n_frames:
        return None
    return n_frames - window


def step_window(first_emitted: int, window: int, block: int, lookahead: int,
                n_frames: int | None = None) -> tuple[int, int | None]:
    """(start of the window, offset of the block in it) of the step emitting ``first_emitted``:
    the usual window (offset None: ``window - lookahead - block``) unless the stream has ended
    with ``n_frames`` frames and ``end_window`` gives its last window."""
    end = None if n_frames is None else end_window(first_emitted, n_frames, window, block,
                                                    lookahead)
    if end is None:
        return window_start(first_emitted, window, block, lookahead), None
    return end, first_emitted - end


def triangle(window: int) -> Tensor:
    """Overlap-add weights: highest mid-window (where the model sees the most context), never
    zero, so the first and last frames of a clip keep their only estimate."""
    t = (torch.arange(window) + 0.5) / window
    return (1 - (2 * t - 1).abs()).clamp_min(1e-3)


def step_masks(separate: SeparateFn, spec_window: Tensor, n_rows: int, block: int,
                lookahead: int, ahead: bool = False, offset: int | None = None) -> Tensor:
    """Masks of the ``block`` emitted frames of one window (and, with ``ahead``, of the frames
    after them to the window's end, for ``Blend``), unwarped to linear bins.

    offset: the first emitted frame's index in the window (default ``window - lookahead -
    block``; an ``end_window`` step's block sits later). spec_window complex (N_BINS, window) ->
    masks float32 (Q, N_BINS, block [+ the frames after it]) in [0, 1].
    """
    assert spec_window.dim() == 2 and spec_window.shape[0] == N_BINS, (
        f"spec_window must be (N_BINS, window), got {tuple(spec_window.shape)}")
    window = spec_window.shape[1]
    x = model_input(spec_window[None], n_rows)  # (1, 1, n_rows, window)
    masks = separate(x)[0]  # (Q, n_rows, window)
    start = window - lookahead - block if offset is None else offset
    emitted = masks[:, :, start:] if ahead else masks[:, :, start:start + block]
    return unwarp(emitted.float()).clamp(0, 1)  # (Q, N_BINS, block [+ lookahead])


class Blend:
    """Emitted masks as the triangle-weighted mean of every step's estimate of their frames.

    Call once per step, in order, with the step's labels and ``step_masks(..., ahead=True)``;
    the estimates of the look-ahead frames are kept per label (an instrument that was not in
    the last step starts afresh, one that left is dropped).
    """

    def __init__(self, window: int, block: int, lookahead: int) -> None:
        check_window(window, block, lookahead)
        self.block, self.start = block, window - lookahead - block
        self.triangle = triangle(window)
        self.carry: dict[str, tuple[Tensor, Tensor]] = {}  # label -> (sum, weight sum)

    def reset(self) -> None:
        """A step without masks (no instrument): nothing carries over it."""
        self.carry = {}

    def __call__(self, labels: list[str], masks: Tensor, offset: int | None = None) -> Tensor:
        """masks (Q, N_BINS, F) of one step, from step_masks(..., ahead=True) -> (Q, N_BINS,
        block) emitted. F is block + lookahead; an ``end_window`` step, whose block starts at
        ``offset`` in its window, has fewer (its frames end with the stream, as do the
        estimates carried to it)."""
        start = self.start if offset is None else offset
        weights = self.triangle[start:start + masks.shape[2]]
        out, carry = [], {}
        for label, m in zip(labels, masks, strict=True):
            acc, wsum = m * weights, weights.clone()
            if label in self.carry:
                old, old_w = self.carry[label]
                acc[:, :old.shape[1]] += old
                wsum[:old_w.shape[0]] += old_w
            out.append(acc[:, :self.block] / wsum[:self.block])
            carry[label] = (acc[:, self.block:], wsum[self.block:])
        self.carry = carry
        if not out:
            return masks[:, :, :self.block]
        return torch.stack(out)


def sliding_masks(separate: SeparateFn, spec: Tensor, n_rows: int, *, window: int, block: int,
                  lookahead: int, blend: bool = False) -> Tensor:
    """Offline reference: masks for every frame of ``spec`` with the live step schedule (and
    ``Blend`` when ``blend``).

    spec complex (N_BINS, T) -> masks float32 (Q, N_BINS, T). Steps emit [0, block),
    [block, 2 block), ...; the last step may emit fewer than ``block`` frames.
    """
    check_window(window, block, lookahead)
    n_frames = spec.shape[1]
    # Zero frames on both sides: the left context of the first step and, for a stream shorter
    # than a window, the right context (lookahead and a partial last block) of the last one.
    left = window - block - lookahead
    right = block + lookahead
    padded = torch.nn.functional.pad(spec, (left, right))
    blender, out = Blend(window, block, lookahead), []
    for e in range(0, n_frames, block):
        s, offset = step_window(e, window, block, lookahead, n_frames)
        m = step_masks(separate, padded[:, s + left:s + left + window], n_rows, block,
                       lookahead, blend, offset)
        if blend:
            m = blender([str(q) for q in range(m.shape[0])], m, offset)
        out.append(m[:, :, :min(block, n_frames - e)])
    return torch.cat(out, dim=2)
