"""models.streaming.Blend: each emitted frame is the triangle-weighted mean of every step's
estimate of it, with no step and no latency added."""

from __future__ import annotations

import pytest
import torch

from models.spectral import N_BINS
from models.streaming import Blend, triangle, window_start


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
