"""Sliding-window mask prediction: the window bookkeeping shared by the live separator node and
offline evaluation, so that "streamed equals offline" is a property of one piece of code.

A step emits ``block`` frames ``[e, e + block)``. Its window holds ``window`` frames ending
``lookahead`` frames after the newest emitted one: ``[e + block + lookahead - window,
e + block + lookahead)``. Frames before 0 or after the end of the stream are zero (silence), so
the first and the last steps see the same kind of padding live and offline.
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


def step_masks(separate: SeparateFn, spec_window: Tensor, n_rows: int, block: int,
               lookahead: int) -> Tensor:
    """Masks of the ``block`` emitted frames of one window, unwarped to linear bins.

    spec_window complex (N_BINS, window) -> masks float32 (Q, N_BINS, block) in [0, 1].
    """
    assert spec_window.dim() == 2 and spec_window.shape[0] == N_BINS, (
        f"spec_window must be (N_BINS, window), got {tuple(spec_window.shape)}")
    window = spec_window.shape[1]
    x = model_input(spec_window[None], n_rows)  # (1, 1, n_rows, window)
    masks = separate(x)[0]  # (Q, n_rows, window)
    end = window - lookahead
    emitted = masks[:, :, end - block:end]  # (Q, n_rows, block)
    return unwarp(emitted.float()).clamp(0, 1)  # (Q, N_BINS, block)


def sliding_masks(separate: SeparateFn, spec: Tensor, n_rows: int, *, window: int, block: int,
                  lookahead: int) -> Tensor:
    """Offline reference: masks for every frame of ``spec`` with the live step schedule.

    spec complex (N_BINS, T) -> masks float32 (Q, N_BINS, T). Steps emit [0, block),
    [block, 2 block), ...; the last step may emit fewer than ``block`` frames.
    """
    check_window(window, block, lookahead)
    n_frames = spec.shape[1]
    # Zero frames on both sides: the left context of the first step and the right context
    # (lookahead and a partial last block) of the last one.
    left = window - block - lookahead
    right = block + lookahead
    padded = torch.nn.functional.pad(spec, (left, right))
    out = []
    for e in range(0, n_frames, block):
        s = window_start(e, window, block, lookahead) + left
        m = step_masks(separate, padded[:, s:s + window], n_rows, block, lookahead)
        out.append(m[:, :, :min(block, n_frames - e)])
    return torch.cat(out, dim=2)
