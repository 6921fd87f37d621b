"""The one spectral front end shared by training and the engine: STFT / inverse STFT (offline and
streaming, numerically the same), the log-frequency warp of Sound-of-Pixels / iQuery, and the
model input built from a complex spectrogram.

Frame t of a signal covers the samples [t*HOP - 511, t*HOP + 511) of the signal, i.e. the signal
is zero-padded (constant, not reflect) by N_FFT // 2 = 511 samples on both sides. Constant padding
lets a stream reproduce the offline frames exactly: a stream is taken to be preceded by 511 zeros.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE_RATE = 11025
N_FFT = 1022
HOP = 256
N_BINS = N_FFT // 2 + 1  # 512
PAD = N_FFT // 2  # 511 zeros on each side

# The log grid of Sound-of-Pixels: row u in [0, 1] reads bin (BASE**u - 1) / (BASE - 1) * (n - 1).
_WARP_BASE = 21.0

_window_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
_warp_cache: dict[tuple[str, int, int, torch.device, torch.dtype],
                  tuple[Tensor, Tensor, Tensor]] = {}


def hann_window(device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The periodic Hann window of N_FFT samples (cached per device and dtype)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (device, dtype)
    if key not in _window_cache:
        _window_cache[key] = torch.hann_window(N_FFT, periodic=True, dtype=dtype, device=device)
    return _window_cache[key]


def _as_tensor(samples: np.ndarray | Tensor) -> Tensor:
    if isinstance(samples, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return samples.float()


def _frames_to_spec(frames: Tensor) -> Tensor:
    """Windowed real FFT of frames laid out as (..., T, N_FFT) -> complex (..., N_BINS, T).

    The offline and streaming STFTs both go through here so that their frames are the same.
    """
    win = hann_window(frames.device, frames.dtype)
    return torch.fft.rfft(frames * win, n=N_FFT, dim=-1).transpose(-1, -2)


def _spec_to_frames(spec: Tensor) -> Tensor:
    """Inverse of the FFT step, windowed again for overlap-add: complex (..., N_BINS, T) ->
    real (..., T, N_FFT). The window squared is what the overlap-add divides by."""
    frames = torch.fft.irfft(spec.transpose(-1, -2), n=N_FFT, dim=-1)
    return frames * hann_window(frames.device, frames.dtype)


def stft(wave: Tensor) -> Tensor:
    """Short-time Fourier transform with centred, zero-padded frames.

    wave: (..., N) real -> complex (..., N_BINS, T) with T = 1 + N // HOP.
    """
    if wave.shape[-1] < 1:
        raise ValueError(f"stft needs at least 1 sample, got shape {tuple(wave.shape)}")
    lead = wave.shape[:-1]
    n = wave.shape[-1]
    x = wave.reshape(-1, n)
    x = F.pad(x, (PAD, PAD))
    n_frames = 1 + n // HOP
    frames = x.unfold(-1, N_FFT, HOP)[:, :n_frames]  # (B, T, N_FFT)
    spec = _frames_to_spec(frames)
    return spec.reshape(*lead, N_BINS, n_frames)


def _overlap_add(frames: Tensor) -> Tensor:
    """(B, T, N_FFT) -> (B, (T - 1) * HOP + N_FFT) summed overlap-add."""
    b, t, _ = frames.shape
    out_len = (t - 1) * HOP + N_FFT
    return F.fold(frames.transpose(1, 2), output_size=(1, out_len), kernel_size=(1, N_FFT),
                  stride=(1, HOP)).reshape(b, out_len)


def _window_sum(n_frames: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Summed squared window of n_frames frames: (1, (n_frames - 1) * HOP + N_FFT)."""
    win2 = hann_window(device, dtype).square()
    return _overlap_add(win2.expand(1, n_frames, N_FFT))


def _normalise(y: Tensor, wsum: Tensor) -> Tensor:
    # Only the outermost padded samples have a (near) zero window sum; they are never returned
    # for a signal, but guard the division anyway.
    return torch.where(wsum > 1e-8, y / wsum.clamp_min(1e-8), torch.zeros_like(y))


def istft(spec: Tensor, length: int) -> Tensor:
    """Inverse STFT by windowed overlap-add divided by the summed squared window.

    spec: complex (..., N_BINS, T) -> real (..., length); istft(stft(x), len(x)) == x.
    """
    if spec.shape[-2] != N_BINS:
        raise ValueError(f"istft expects {N_BINS} bins on dim -2, got shape {tuple(spec.shape)}")
    lead = spec.shape[:-2]
    n_frames = spec.shape[-1]
    frames = _spec_to_frames(spec.reshape(-1, N_BINS, n_frames))
    y = _overlap_add(frames)
    y = _normalise(y, _window_sum(n_frames, y.device, y.dtype))
    y = y[:, PAD:PAD + length]
    if y.shape[-1] < length:  # asked for more samples than the frames cover
        y = F.pad(y, (0, length - y.shape[-1]))
    return y.reshape(*lead, length)


class StreamingSTFT:
    """Incremental STFT whose frames equal stft() of the whole signal.

    push() returns every frame whose N_FFT samples are all known; flush() returns the trailing
    frames that reach into the right zero padding, as stft() of the whole stream would.
    """

    def __init__(self) -> None:
        self.frames_done = 0
        self.samples_seen = 0
        # Padded samples not yet consumed; padded index of buf[0] is frames_done * HOP.
        self._buf = torch.zeros(PAD)

    def push(self, samples: np.ndarray | Tensor) -> Tensor:
        """samples: 1-D float (n,) -> complex (N_BINS, t_new) of newly complete frames."""
        x = _as_tensor(samples)
        if x.dim() != 1:
            raise ValueError(f"StreamingSTFT.push expects 1-D samples, got shape {tuple(x.shape)}")
        self.samples_seen += x.shape[0]
        self._buf = torch.cat([self._buf, x.to(self._buf.dtype)])
        return self._emit(self._buf)

    def _emit(self, buf: Tensor) -> Tensor:
        n_new = 0 if buf.shape[0] < N_FFT else 1 + (buf.shape[0] - N_FFT) // HOP
        if n_new == 0:
            return torch.zeros(N_BINS, 0, dtype=torch.complex64)
        frames = buf.unfold(0, N_FFT, HOP)[:n_new]  # (t_new, N_FFT)
        self._buf = buf[n_new * HOP:].clone()
        self.frames_done += n_new
        return _frames_to_spec(frames)

    def flush(self) -> Tensor:
        """Frames that need right zero padding: complex (N_BINS, t_rest). Total frames then equal
        1 + samples_seen // HOP, as for stft()."""
        total = 1 + self.samples_seen // HOP
        n_rest = total - self.frames_done
        if n_rest <= 0:
            return torch.zeros(N_BINS, 0, dtype=torch.complex64)
        need = (n_rest - 1) * HOP + N_FFT
        buf = F.pad(self._buf, (0, max(0, need - self._buf.shape[0])))
        frames = buf.unfold(0, N_FFT, HOP)[:n_rest]
        self._buf = buf[n_rest * HOP:].clone()
        self.frames_done += n_rest
        return _frames_to_spec(frames)


class StreamingISTFT:
    """Incremental inverse STFT; the concatenated output equals istft() of all frames.

    Output sample 0 is the signal's sample 0 (the 511 leading padded samples are dropped); the
    caller trims the end to the true length after flush().
    """

    def __init__(self) -> None:
        self.frames_done = 0
        self.samples_out = 0
        self._acc: Tensor | None = None  # (..., L) sums; padded index of acc[0] is _acc_start
        self._wsum: Tensor | None = None
        self._acc_start = 0
        self._lead: torch.Size | None = None  # leading dims of the first push

    def push(self, frames: Tensor) -> Tensor:
        """frames: complex (..., N_BINS, t) -> real (..., n_new) of samples no later frame
        touches."""
        if frames.shape[-2] != N_BINS:
            raise ValueError(f"StreamingISTFT.push expects {N_BINS} bins on dim -2, "
                             f"got shape {tuple(frames.shape)}")
        lead = frames.shape[:-2]
        if self._lead is None:
            self._lead = lead
        elif lead != self._lead:
            raise ValueError(f"StreamingISTFT.push: leading dims changed from "
                             f"{tuple(self._lead)} to {tuple(lead)}")
        t = frames.shape[-1]
        if t > 0:
            time_frames = _spec_to_frames(frames.reshape(-1, N_BINS, t))  # (B, t, N_FFT)
            b = time_frames.shape[0]
            start = self.frames_done * HOP  # padded index of the first new frame
            end = (self.frames_done + t - 1) * HOP + N_FFT
            if self._acc is None:
                self._acc = time_frames.new_zeros(b, 0)
                self._wsum = time_frames.new_zeros(1, 0)
            grow = end - (self._acc_start + self._acc.shape[-1])
            if grow > 0:
                self._acc = F.pad(self._acc, (0, grow))
                self._wsum = F.pad(self._wsum, (0, grow))
            off = start - self._acc_start
            self._acc[:, off:off + end - start] += _overlap_add(time_frames)
            win2 = hann_window(time_frames.device, time_frames.dtype).square()
            self._wsum[:, off:off + end - start] += _overlap_add(win2.expand(1, t, N_FFT))
            self.frames_done += t
        # Padded samples before the next frame's start are final.
        return self._take(self.frames_done * HOP)

    def _take(self, final_end: int) -> Tensor:
        lead = self._lead if self._lead is not None else torch.Size([])
        if self._acc is None:
            return torch.zeros(*lead, 0)
        n_final = final_end - self._acc_start
        y = _normalise(self._acc[:, :n_final], self._wsum[:, :n_final])
        self._acc = self._acc[:, n_final:]
        self._wsum = self._wsum[:, n_final:]
        self._acc_start = final_end
        # Drop the samples that belong to the leading padding.
        skip = max(0, PAD - (final_end - n_final))
        y = y[:, min(skip, y.shape[-1]):]
        self.samples_out += y.shape[-1]
        return y.reshape(*lead, y.shape[-1])

    def flush(self) -> Tensor:
        """Every remaining sample (..., n_rest), including those of the right padding."""
        if self._acc is None:
            return self._take(0)
        return self._take(self._acc_start + self._acc.shape[-1])


def _interp_taps(positions: Tensor, n_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """Linear interpolation reading the input at fractional positions: output row i is
    w_lo[i] * row lo[i] + w_hi[i] * row lo[i] + 1. -> lo (n_out,) long, w_lo and w_hi
    (n_out, 1)."""
    pos = positions.clamp(0, n_in - 1)
    lo = pos.floor().long().clamp(max=n_in - 2)
    frac = pos - lo.to(pos.dtype)
    return lo, (1 - frac)[:, None], frac[:, None]


def _warp_taps(kind: str, n_out: int, n_in: int, device: torch.device,
               dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    key = (kind, n_out, n_in, device, dtype)
    if key not in _warp_cache:
        u = torch.linspace(0, 1, n_out, dtype=torch.float64)
        if kind == "warp":  # row u of the log grid reads linear bin position
            pos = (_WARP_BASE ** u - 1) / (_WARP_BASE - 1) * (n_in - 1)
        else:  # bin u reads the log-grid row that holds its frequency
            pos = torch.log1p(u * (_WARP_BASE - 1)) / math.log(_WARP_BASE) * (n_in - 1)
        lo, w_lo, w_hi = _interp_taps(pos, n_in)
        _warp_cache[key] = (lo.to(device), w_lo.to(device=device, dtype=dtype),
                            w_hi.to(device=device, dtype=dtype))
    return _warp_cache[key]


def _resample_rows(x: Tensor, kind: str, n_out: int) -> Tensor:
    """Interpolate x (..., n_in, T) along its rows onto n_out rows. The two taps of each row
    are gathered: about half the time of the equivalent dense (n_out, n_in) matmul on a
    training batch's spectra and on a live step's masks (`scripts/bench_model.py --only warp`)."""
    lo, w_lo, w_hi = _warp_taps(kind, n_out, x.shape[-2], x.device, x.dtype)
    x = x.contiguous()  # gathering the rows of a transposed STFT view in place was ~6x slower
    return torch.addcmul(x.index_select(-2, lo) * w_lo, x.index_select(-2, lo + 1), w_hi)


def warp(x: Tensor, n_rows: int) -> Tensor:
    """Resample linear-frequency bins onto the log-frequency grid (bilinear along frequency, as
    grid_sample with align_corners=True on the Sound-of-Pixels grid; time untouched).

    x: (B, C, N_BINS, T) -> (B, C, n_rows, T).
    """
    if n_rows < 2:
        raise ValueError(f"warp needs n_rows >= 2, got {n_rows}")
    return _resample_rows(x, "warp", n_rows)


def unwarp(x: Tensor, n_bins: int = N_BINS) -> Tensor:
    """Inverse of warp(): log-frequency rows back to linear bins.

    x: (B, C, n_rows, T) -> (B, C, n_bins, T).
    """
    if x.shape[-2] < 2:
        raise ValueError(f"unwarp needs at least 2 rows, got shape {tuple(x.shape)}")
    return _resample_rows(x, "unwarp", n_bins)


def model_input(spec: Tensor, n_rows: int) -> Tensor:
    """Network input from a complex spectrogram: log1p of the warped magnitude.

    spec: complex (B, N_BINS, T) -> (B, 1, n_rows, T).
    """
    if spec.dim() != 3 or spec.shape[1] != N_BINS:
        raise ValueError(f"model_input expects complex (B, {N_BINS}, T), "
                         f"got shape {tuple(spec.shape)}")
    return torch.log1p(warp(spec.abs().unsqueeze(1), n_rows))


def apply_masks(masks: Tensor, spec: Tensor) -> Tensor:
    """Masks predicted on the warped grid applied to the mixture: unwarp to N_BINS, scale the
    mixture magnitude, keep the mixture phase (a real mask times the complex bin does both).

    masks: (B, Q, n_rows, T) real, spec: complex (B, N_BINS, T) -> complex (B, Q, N_BINS, T).
    """
    if spec.dim() != 3 or spec.shape[1] != N_BINS or masks.shape[-1] != spec.shape[-1]:
        raise ValueError(f"apply_masks expects masks (B, Q, rows, T) and spec (B, {N_BINS}, T), "
                         f"got {tuple(masks.shape)} and {tuple(spec.shape)}")
    return unwarp(masks).clamp(0, 1) * spec[:, None]
