"""Offline separation of a clip of any length with a trained separator: sliding windows of the
model's n_frames STFT frames, hop n_frames // 2 (50% overlap), masks overlap-added on the warped
grid with triangular weights, then applied to the whole mixture spectrogram (mixture phase) and
inverted once. This is the offline reference that the streaming engine mirrors.

Also the one place that maps an audio window onto its motion tokens (one token per video frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from models.spectral import HOP, SAMPLE_RATE, apply_masks, istft, model_input, stft
from models.streaming import triangle

FPS = 8.0


def motion_len(n_frames: int, fps: float = FPS) -> int:
    """Motion tokens per window of n_frames STFT frames: every video frame it spans, + 1."""
    return math.ceil((n_frames - 1) * HOP / SAMPLE_RATE * fps) + 1


def motion_window(tokens: np.ndarray, start_frame: int, n_frames: int, fps: float = FPS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Motion tokens of the window whose first STFT frame is `start_frame` (frame t is centred
    on sample t * HOP; a streaming window may start before the clip, at a negative frame).
    tokens (n_video, D) -> (Tm, D) float32 and pad (Tm,) bool (True where the window runs
    outside the video). Any per-frame array works: crop tubes (n_video, H, W, 3) give
    (Tm, H, W, 3)."""
    tm = motion_len(n_frames, fps)
    first = round(start_frame * HOP / SAMPLE_RATE * fps)
    idx = np.arange(first, first + tm)
    pad = (idx < 0) | (idx >= len(tokens))
    out = np.zeros((tm, *tokens.shape[1:]), np.float32)
    out[~pad] = tokens[idx[~pad]]
    return out, pad


@dataclass
class Query:
    """One visually named source: object feature (obj_dim,), class id, motion tokens
    (n_video, motion_dim), one per video frame from the clip's start."""

    obj: np.ndarray
    class_id: int
    motion: np.ndarray


def window_starts(n_total: int, window: int, hop: int | None = None) -> list[int]:
    """Start frames of windows of `window` frames, hop window // 2 unless given, the last one
    flush with the end (n_total >= window)."""
    hop = hop or window // 2
    starts = list(range(0, n_total - window + 1, hop))
    if starts[-1] != n_total - window:
        starts.append(n_total - window)
    return starts


@torch.no_grad()
def separate_masks(model: nn.Module, spec: Tensor, queries: list[Query], fps: float = FPS,
                   batch: int = 8, hop: int | None = None) -> Tensor:
    """spec complex (N_BINS, T) of the whole mixture -> warped masks (Q, n_rows, T); windows
    every `hop` frames (default half a window)."""
    n_rows, window = model.n_rows, model.n_frames
    device = next(model.parameters()).device
    t_total = spec.shape[-1]
    padded = spec
    if t_total < window:  # a clip shorter than one window: pad with silence, cut after
        padded = torch.nn.functional.pad(spec, (0, window - t_total))
    starts = window_starts(padded.shape[-1], window, hop)
    q = len(queries)
    obj = torch.from_numpy(np.stack([x.obj for x in queries])).float()
    cls = torch.tensor([x.class_id for x in queries])
    acc = torch.zeros(q, n_rows, padded.shape[-1])
    wsum = torch.zeros(padded.shape[-1])
    w = triangle(window)
    for a in range(0, len(starts), batch):
        chunk = starts[a:a + batch]
        x = model_input(torch.stack([padded[:, s:s + window] for s in chunk]), n_rows)
        mot, pad = zip(*[zip(*[motion_window(qq.motion, s, window, fps) for qq in queries],
                             strict=True)
                         for s in chunk], strict=True)
        motion = torch.from_numpy(np.array(mot, np.float32))  # (b, Q, Tm, D)
        motion_pad = torch.from_numpy(np.array(pad, bool))
        b = len(chunk)
        masks = model(x.to(device), obj[None].expand(b, -1, -1).to(device),
                      cls[None].expand(b, -1).to(device), motion.to(device),
                      motion_pad.to(device),
                      torch.zeros(b, q, dtype=torch.bool, device=device)).float().cpu()
        for j, s in enumerate(chunk):
            acc[:, :, s:s + window] += masks[j] * w
            wsum[s:s + window] += w
    return (acc / wsum)[:, :, :t_total]


def separate_wave(model: nn.Module, wave: np.ndarray, queries: list[Query],
                  fps: float = FPS) -> np.ndarray:
    """wave (N,) float mixture -> estimates (Q, N), one per query (mixture phase)."""
    x = torch.from_numpy(np.asarray(wave, np.float32))
    spec = stft(x)  # (N_BINS, T)
    masks = separate_masks(model, spec, queries, fps)
    est = apply_masks(masks[None], spec[None])[0]  # (Q, N_BINS, T)
    return istft(est, x.shape[-1]).numpy()
