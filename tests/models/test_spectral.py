"""DSP invariants of the spectral front end: perfect reconstruction, streamed == offline, and
the log-frequency warp round trip."""

import numpy as np
import pytest
import torch

from models.spectral import (
    HOP,
    N_BINS,
    N_FFT,
    StreamingISTFT,
    StreamingSTFT,
    apply_masks,
    istft,
    model_input,
    stft,
    unwarp,
    warp,
)


@pytest.fixture
def wave() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 9000, generator=gen)


def test_stft_shape_and_matches_torch(wave: torch.Tensor) -> None:
    spec = stft(wave)
    assert spec.shape == (2, 3, N_BINS, 1 + 9000 // HOP)
    assert spec.is_complex()
    ref = torch.stft(wave.reshape(-1, 9000), N_FFT, HOP, window=torch.hann_window(N_FFT),
                     center=True, pad_mode="constant", return_complex=True)
    torch.testing.assert_close(spec.reshape(-1, N_BINS, spec.shape[-1]), ref,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("length", [9000, 256 * 20, 1, 1021])
def test_stft_istft_reconstructs(length: int) -> None:
    x = torch.randn(4, length, generator=torch.Generator().manual_seed(length))
    y = istft(stft(x), length)
    assert y.shape == x.shape
    assert (y - x).abs().max().item() < 1e-5


def test_streaming_stft_identical_to_batch(wave: torch.Tensor) -> None:
    x = wave[0, 0]
    full = stft(x)
    rng = np.random.default_rng(1)
    stream = StreamingSTFT()
    chunks, i = [], 0
    while i < x.shape[0]:
        n = int(rng.integers(1, 700))
        chunks.append(stream.push(x[i:i + n].numpy()))
        assert stream.frames_done == sum(c.shape[-1] for c in chunks)
        i += n
    chunks.append(stream.flush())
    streamed = torch.cat(chunks, dim=-1)
    assert streamed.shape == full.shape
    assert stream.frames_done == full.shape[-1]
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-6)


def test_streaming_stft_emits_only_complete_frames() -> None:
    stream = StreamingSTFT()
    # Frame 0 covers padded samples [0, 1022) = 511 zeros + signal samples [0, 511).
    assert stream.push(np.zeros(510, np.float32)).shape == (N_BINS, 0)
    assert stream.push(np.zeros(1, np.float32)).shape == (N_BINS, 1)
    assert stream.push(np.zeros(HOP - 1, np.float32)).shape == (N_BINS, 0)
    assert stream.push(np.zeros(1, np.float32)).shape == (N_BINS, 1)


def test_streaming_istft_identical_to_batch(wave: torch.Tensor) -> None:
    spec = stft(wave)  # (2, 3, 512, T)
    length = wave.shape[-1]
    offline = istft(spec, length)
    rng = np.random.default_rng(2)
    stream = StreamingISTFT()
    outs, t = [], 0
    while t < spec.shape[-1]:
        n = int(rng.integers(0, 6))
        outs.append(stream.push(spec[..., t:t + n]))
        t += n
    outs.append(stream.flush())
    streamed = torch.cat(outs, dim=-1)
    assert streamed.shape[:-1] == offline.shape[:-1]
    assert streamed.shape[-1] >= length
    torch.testing.assert_close(streamed[..., :length], offline, rtol=0, atol=1e-5)
    assert (streamed[..., :length] - wave).abs().max().item() < 1e-5


def test_streaming_istft_releases_only_final_samples() -> None:
    spec = stft(torch.randn(3000))
    stream = StreamingISTFT()
    # After frames 0..k-1, padded samples < k*HOP are final; 511 of them are leading padding.
    assert stream.push(spec[:, :2]).shape == (2 * HOP - 511,)
    assert stream.push(spec[:, 2:5]).shape == (3 * HOP,)


def test_warp_unwarp_round_trip_smooth() -> None:
    bins = torch.linspace(0, 1, N_BINS)
    smooth = torch.stack([torch.sin(2 * torch.pi * bins * k) + 1.5 for k in (0.5, 1.0, 2.0)])
    x = smooth[None, :, :, None].expand(2, 3, N_BINS, 7).contiguous()  # (B, C, F, T)
    w = warp(x, 256)
    assert w.shape == (2, 3, 256, 7)
    back = unwarp(w)
    assert back.shape == x.shape
    assert (back - x).abs().max().item() < 5e-3
    # The grid is log-spaced: the lower half of the rows covers far fewer than half of the bins.
    ramp = torch.arange(N_BINS, dtype=torch.float32)[None, None, :, None]
    rows = warp(ramp, 256)[0, 0, :, 0]
    assert rows[0].item() == pytest.approx(0.0, abs=1e-4)
    assert rows[-1].item() == pytest.approx(N_BINS - 1, abs=1e-3)
    assert rows[128].item() < N_BINS / 4
    assert torch.all(rows[1:] > rows[:-1])


def test_warp_and_unwarp_are_linear_interpolation_at_the_log_grid() -> None:
    """Against numpy's interp, column by column: warp's row u reads linear bin
    (21**u - 1) / 20 * 511, unwarp's bin v reads the row that holds its frequency."""
    x = torch.randn(2, 3, N_BINS, 5, generator=torch.Generator().manual_seed(7))
    rows = 256
    u = np.linspace(0, 1, rows)
    at_bins = (21.0 ** u - 1) / 20 * (N_BINS - 1)
    ref = np.apply_along_axis(lambda col: np.interp(at_bins, np.arange(N_BINS), col), 2,
                              x.double().numpy())
    np.testing.assert_allclose(warp(x, rows).numpy(), ref, atol=1e-5)
    w = torch.randn(2, 3, rows, 5, generator=torch.Generator().manual_seed(8))
    v = np.linspace(0, 1, N_BINS)
    at_rows = np.log1p(20 * v) / np.log(21) * (rows - 1)
    ref = np.apply_along_axis(lambda col: np.interp(at_rows, np.arange(rows), col), 2,
                              w.double().numpy())
    np.testing.assert_allclose(unwarp(w).numpy(), ref, atol=1e-5)
    # A transposed (non-contiguous) view gives the same numbers.
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(warp(xt, rows), warp(x, rows))


def test_model_input() -> None:
    spec = stft(torch.randn(2, 4000))
    x = model_input(spec, 128)
    assert x.shape == (2, 1, 128, spec.shape[-1])
    assert torch.all(x >= 0)
    with pytest.raises(ValueError, match="512"):
        model_input(spec[:, :100], 128)


def test_apply_masks_identity_and_split() -> None:
    x = torch.randn(2, 5000, generator=torch.Generator().manual_seed(3))
    spec = stft(x)
    ones = torch.ones(2, 3, 64, spec.shape[-1])
    out = apply_masks(ones, spec)
    assert out.shape == (2, 3, N_BINS, spec.shape[-1])
    torch.testing.assert_close(istft(out[:, 1], 5000), x, rtol=0, atol=1e-5)
    # Complementary masks sum back to the mixture.
    m = torch.rand(2, 1, 64, spec.shape[-1])
    parts = apply_masks(torch.cat([m, 1 - m], dim=1), spec)
    torch.testing.assert_close(parts.sum(dim=1), spec, rtol=1e-5, atol=1e-5)
