"""models.streaming: Blend (each emitted frame is the triangle-weighted mean of every step's
estimate of it, with no step and no latency added) and the end of a stream (its last steps read
its last window instead of silence after it)."""

from __future__ import annotations

import pytest
import torch

from models.spectral import N_BINS
from models.streaming import Blend, end_window, sliding_masks, triangle, window_start


def step_values(window: int, block: int, lookahead: int, n_steps: int) -> list[torch.Tensor]:
    """What step_masks would return if step i estimated every frame as i + 1 (one query)."""
    return [torch.full((1, N_BINS, block + lookahead), float(i + 1)) for i in range(n_steps)]


@pytest.mark.parametrize("window, block, lookahead", [(16, 4, 6), (16, 2, 4), (16, 4, 3),
                                                      (16, 8, 8)])
def test_each_frame_is_the_weighted_mean_of_the_steps_that_saw_it(window, block, lookahead):
    n_steps = 8
    blend = Blend(window, block, lookahead)
    got = torch.cat([blend(["a"], m) for m in step_values(window, block, lookahead, n_steps)], 2)
    w = triangle(window)
    for f in range(n_steps * block):
        emitter = f // block  # the step that emits frame f
        num = den = 0.0
        for i in range(emitter + 1):  # earlier steps saw f in their look-ahead frames
            pos = f - window_start(i * block, window, block, lookahead)
            if pos < window - lookahead - block or pos >= window:
                continue  # not among the frames step i hands on
            num += float(w[pos]) * (i + 1)
            den += float(w[pos])
        assert got[0, 0, f].item() == pytest.approx(num / den, rel=1e-5), f
    assert got[0, 0, block].item() > 1  # a frame seen by two steps carries both


def test_without_lookahead_nothing_is_blended():
    blend = Blend(16, 4, 0)
    steps = step_values(16, 4, 0, 3)
    assert torch.equal(torch.cat([blend(["a"], m) for m in steps], 2),
                       torch.cat(steps, 2))


def test_a_new_label_starts_afresh_a_gone_one_is_dropped_and_reset_clears():
    blend = Blend(16, 4, 6)
    first = torch.stack([torch.full((N_BINS, 10), 1.0), torch.full((N_BINS, 10), 5.0)])
    blend(["violin#1", "flute#1"], first)
    second = torch.stack([torch.full((N_BINS, 10), 3.0), torch.full((N_BINS, 10), 7.0)])
    out = blend(["piano#1", "violin#1"], second)
    assert torch.all(out[0] == 3.0)  # piano: its own estimate only
    assert torch.all((out[1] > 1.0) & (out[1] < 7.0))  # violin: both steps' estimates
    assert set(blend.carry) == {"piano#1", "violin#1"}
    blend.reset()
    assert torch.all(blend(["violin#1"], second[1:]) == 7.0)


def test_end_window_only_where_the_usual_window_would_pass_the_end():
    # window 16, block 4, lookahead 6: the step emitting e reads [e - 6, e + 10)
    assert end_window(0, 40, 16, 4, 6) is None
    assert end_window(30, 40, 16, 4, 6) is None  # [24, 40) fits
    assert end_window(31, 40, 16, 4, 6) == 24  # [25, 41) would not: the last 16 frames
    assert end_window(36, 40, 16, 4, 6) == 24
    assert end_window(8, 12, 16, 4, 6) is None  # shorter than a window: zeros after it


def spectrum(n_frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.complex(torch.rand(N_BINS, n_frames, generator=g) + 0.5,
                         torch.zeros(N_BINS, n_frames))


@pytest.mark.parametrize("n_frames", [43, 44, 48])
def test_the_last_steps_read_the_last_window(n_frames):
    """A mask that depends on the whole window (its mean): the last frames come out as the
    last window's own, where zeros after the end would have lowered the mean."""
    window, block, lookahead = 16, 4, 6

    def separate(x: torch.Tensor) -> torch.Tensor:  # (1, 1, rows, window) -> (1, 1, rows, window)
        return torch.sigmoid(x.mean(-1, keepdim=True) - 0.5).expand_as(x)

    spec = spectrum(n_frames)
    got = sliding_masks(separate, spec, 8, window=window, block=block, lookahead=lookahead)
    last = sliding_masks(separate, spec[:, -window:], 8, window=window, block=window,
                         lookahead=0)  # one step over exactly the last window
    first_end = next(e for e in range(0, n_frames, block)
                     if end_window(e, n_frames, window, block, lookahead) is not None)
    torch.testing.assert_close(got[:, :, first_end:], last[:, :, first_end - n_frames:])
    padded = torch.nn.functional.pad(spec, (0, block + lookahead))[:, -window:]
    zeros_after = sliding_masks(separate, padded, 8, window=window, block=window, lookahead=0)
    last_real = window - block - lookahead - 1  # the stream's last frame in that window
    assert (got[:, :, -1] - zeros_after[:, :, last_real]).abs().max() > 1e-3


@pytest.mark.parametrize("n_frames", [42, 45])
def test_blend_at_the_end_weights_each_estimate_at_its_place_in_its_window(n_frames):
    """Step i estimates every frame as (i + 1) / 100: each frame is the triangle-weighted mean
    of the steps that saw it, the last ones placed in the stream's last window."""
    window, block, lookahead = 16, 4, 6
    calls: list[int] = []

    def separate(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls))
        return torch.full_like(x, len(calls) / 100)

    got = sliding_masks(separate, spectrum(n_frames), 8, window=window, block=block,
                        lookahead=lookahead, blend=True)
    w = triangle(window)
    starts = []
    for e in range(0, n_frames, block):
        end = end_window(e, n_frames, window, block, lookahead)
        starts.append((e, window_start(e, window, block, lookahead) if end is None else end))
    for f in range(n_frames):
        num = den = 0.0
        for i, (e, s) in enumerate(starts):
            if e <= f and s <= f < s + window:  # step i emitted f or handed its estimate on
                num += float(w[f - s]) * (i + 1) / 100
                den += float(w[f - s])
        assert got[0, 0, f].item() == pytest.approx(num / den, rel=1e-5), f
