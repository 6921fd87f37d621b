"""The audio U-Net of Sound-of-Pixels / iQuery: a log-frequency spectrogram window in, an audio
embedding at full resolution out, plus a coarse decoder feature map for the transformer.

Both separators only ever read the embedding through per-query weighted sums of its channels
(one mask logit map per query), so the U-Net hands out the input of its outermost layer and
mix() forms those sums without building the wide embedding itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _channels(ngf: int, depth: int) -> list[int]:
    """Channels after each down level: ngf, 2 ngf, 4 ngf, 8 ngf, 8 ngf, ..."""
    return [ngf * min(2 ** i, 8) for i in range(depth)]


def token_strides(depth: int) -> list[int]:
    """The strides a U-Net of `depth` levels offers for its decoder map: 2, 4, ..., 2^(depth-1)."""
    return [2 ** k for k in range(1, depth)]


class AudioUNet(nn.Module):
    """U-Net with `depth` stride-2 levels down and up (4x4 kernels, skip connections).

    The input height and width must be divisible by 2 ** depth. forward() returns `top`, the
    input of the outermost up level (a linear transposed convolution to the `out_channels`-
    channel embedding at full resolution: embedding(top)), and the decoder feature map at stride
    `token_stride` (the output of the up level that restores that stride, before its skip).
    mix(top, coeffs) gives the per-query channel sums of the embedding.
    """

    def __init__(self, *, in_channels: int = 1, out_channels: int = 32, ngf: int = 64,
                 depth: int = 7, token_stride: int = 16) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"U-Net depth must be >= 2, got {depth}")
        levels = token_strides(depth)
        if token_stride not in levels:
            raise ValueError(f"token_stride must be one of {levels} for depth {depth}, "
                             f"got {token_stride}")
        self.depth = depth
        self.token_level = token_stride.bit_length() - 1  # up level whose output is the map
        ch = _channels(ngf, depth)
        self.token_channels = ch[self.token_level - 1]

        self.down = nn.ModuleList()
        for i in range(depth):
            c_in = in_channels if i == 0 else ch[i - 1]
            # No norm on the outermost and innermost levels, as in Sound-of-Pixels.
            norm = nn.Identity() if i in (0, depth - 1) else nn.BatchNorm2d(ch[i])
            self.down.append(nn.Sequential(
                nn.Conv2d(c_in, ch[i], 4, stride=2, padding=1, bias=False), norm,
                nn.LeakyReLU(0.2, inplace=True)))
        self.up = nn.ModuleList()
        for i in range(depth):  # up[i] restores the resolution of down[i]'s input
            c_in = ch[i] if i == depth - 1 else 2 * ch[i]
            if i == 0:
                self.up.append(nn.ConvTranspose2d(c_in, out_channels, 4, stride=2, padding=1))
            else:
                self.up.append(nn.Sequential(
                    nn.ConvTranspose2d(c_in, ch[i - 1], 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(ch[i - 1]), nn.ReLU(inplace=True)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C_in, F, T) -> (top (B, 2 ngf, F / 2, T / 2),
        feature map (B, token_channels, F / token_stride, T / token_stride))."""
        step = 2 ** self.depth
        assert x.shape[-2] % step == 0 and x.shape[-1] % step == 0, (
            f"U-Net of depth {self.depth} needs F and T divisible by {step}, "
            f"got {tuple(x.shape)}")
        skips = []
        h = x
        for layer in self.down:
            h = layer(h)
            skips.append(h)
        feat = h
        h = skips[-1]
        for i in range(self.depth - 1, 0, -1):
            h = self.up[i](h)
            if i == self.token_level:
                feat = h
            h = torch.cat([h, skips[i - 1]], dim=1)
        return h, feat

    def embedding(self, top: Tensor) -> Tensor:
        """top (B, 2 ngf, F / 2, T / 2) -> the audio embedding (B, out_channels, F, T)."""
        return self.up[0](top)

    def mix_by_embedding(self, top: Tensor, coeffs: Tensor) -> Tensor:
        """mix() the plain way: the full embedding, then its weighted channel sums (the ONNX
        export's path, and the reference of the tests and benchmarks)."""
        return torch.einsum("bqc,bcft->bqft", coeffs, self.embedding(top))

    def mix(self, top: Tensor, coeffs: Tensor) -> Tensor:
        """top (B, 2 ngf, F / 2, T / 2), coeffs (B, Q, out_channels) -> (B, Q, F, T), equal to
        mix_by_embedding: einsum("bqc,bcft->bqft", coeffs, embedding(top)).

        The outermost layer is linear (no norm, no activation), so the sum over its output
        channels can be taken over its weights first: one transposed convolution per sample
        from 2 ngf channels to Q (a grouped convolution, one group per sample) instead of one
        to out_channels followed by the sum. With Q = 3 and 32 channels that is ~10x fewer
        multiply-adds in the widest layer of the network and no full-resolution 32-channel
        tensor to keep for the backward pass (docs/MODELS.md)."""
        if torch.compiler.is_exporting():
            # ONNX's ConvTranspose takes its group count as a fixed attribute, so a graph with
            # a dynamic batch (models/export.py) cannot hold one group per sample: the exported
            # graph sums over the embedding itself (the same function at its former cost).
            return self.mix_by_embedding(top, coeffs)
        layer = self.up[0]
        b, c_in, f, t = top.shape
        q = coeffs.shape[1]
        if q == 0:
            return top.new_zeros(b, 0, 2 * f, 2 * t)
        # ConvTranspose2d weights are (C_in, C_out, kh, kw): contract C_out with each query.
        weight = torch.einsum("bqc,icyx->biqyx", coeffs, layer.weight)
        weight = weight.reshape(b * c_in, q, *layer.kernel_size)
        bias = (coeffs @ layer.bias).reshape(b * q)
        out = F.conv_transpose2d(top.reshape(1, b * c_in, f, t), weight, bias,
                                 stride=layer.stride, padding=layer.padding, groups=b)
        return out.reshape(b, q, *out.shape[2:])
