"""Sound-of-Pixels baseline (Zhao et al., ECCV 2018) on the iQuery front end: a K-channel audio
embedding from the same U-Net, a K-vector per source from its object feature, and per bin
mask = sigmoid(sum_k audio_k * visual_k + bias). Call shapes match IQuery so they swap."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.iquery import QueryCache
from models.unet import AudioUNet


class SoundOfPixels(nn.Module):
    """Sound-of-Pixels separator; motion and class ids are accepted and ignored.

    Its "queries" (cached per source, like IQuery's) are the K-dim visual vectors.
    """

    def __init__(self, *, n_rows: int = 256, n_frames: int = 256, ngf: int = 64,
                 unet_depth: int = 7, n_channels: int = 32, obj_dim: int = 512) -> None:
        super().__init__()
        self.kwargs = {"n_rows": n_rows, "n_frames": n_frames, "ngf": ngf, "unet_depth": unet_depth,
                       "n_channels": n_channels, "obj_dim": obj_dim}
        self.n_rows, self.n_frames = n_rows, n_frames
        # token_stride is unused here; any valid level will do.
        self.unet = AudioUNet(in_channels=1, out_channels=n_channels, ngf=ngf, depth=unet_depth,
                              token_stride=2)
        self.visual_proj = nn.Linear(obj_dim, n_channels)
        # Per-channel scale and a bias, as SoP's "linear" synthesizer.
        self.scale = nn.Parameter(torch.ones(n_channels))
        self.bias = nn.Parameter(torch.zeros(1))

    def encode_visual(self, obj_feats: Tensor, class_ids: Tensor | None = None,
                      motion: Tensor | None = None, motion_pad: Tensor | None = None,
                      query_pad: Tensor | None = None) -> QueryCache:
        """obj_feats (B, Q, obj_dim) -> QueryCache(queries (B, Q, K), query_pad (B, Q))."""
        b, q, _ = obj_feats.shape
        if query_pad is None:
            query_pad = torch.zeros(b, q, dtype=torch.bool, device=obj_feats.device)
        assert query_pad.dtype == torch.bool, f"query_pad must be bool, got {query_pad.dtype}"
        return QueryCache(queries=torch.sigmoid(self.visual_proj(obj_feats)), query_pad=query_pad)

    def separate(self, x: Tensor, cache: QueryCache) -> Tensor:
        """x (B, 1, F, T) -> masks (B, Q, F, T) in [0, 1]; zero for padded slots."""
        assert x.shape[1:] == (1, self.n_rows, self.n_frames), (
            f"expected input (B, 1, {self.n_rows}, {self.n_frames}), got {tuple(x.shape)}")
        top, _ = self.unet(x)
        vis = cache.queries * self.scale  # (B, Q, K)
        # sum_k vis_k * audio_k at every bin, audio the K-channel embedding (AudioUNet.mix)
        masks = torch.sigmoid(self.unet.mix(top, vis) + self.bias)
        return masks.masked_fill(cache.query_pad[:, :, None, None], 0.0)

    def forward(self, x: Tensor, obj_feats: Tensor, class_ids: Tensor | None = None,
                motion: Tensor | None = None, motion_pad: Tensor | None = None,
                query_pad: Tensor | None = None) -> Tensor:
        """Same call as IQuery.forward: x (B, 1, F, T), obj_feats (B, Q, obj_dim)
        -> masks (B, Q, F, T)."""
        return self.separate(x, self.encode_visual(obj_feats, query_pad=query_pad))
