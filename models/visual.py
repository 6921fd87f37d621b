"""Visual encoders: an object encoder (ResNet-18 + linear + max pool over frames) for visual
naming, and a small I3D-style 3-D CNN that turns a track's crop tube into motion tokens."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn


class ObjectEncoder(nn.Module):
    """ResNet-18 (torchvision architecture, random init) -> linear -> max over frames.

    Any crop size works (the ResNet ends in adaptive average pooling); 224 x 224 as in the
    paper, 112 x 112 for CPU training.
    """

    def __init__(self, *, obj_dim: int = 512) -> None:
        super().__init__()
        self.kwargs = {"obj_dim": obj_dim}
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Identity()  # (N, 512) pooled features
        self.proj = nn.Linear(512, obj_dim)

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a user's local ResNet-18 state dict (.pth/.pt via torch.load(weights_only=True),
        or .safetensors) into the backbone; its classifier ('fc.*') is dropped."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"weights file must end in .pth, .pt or .safetensors, got {path}")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a ResNet-18 state dict: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")

    def forward(self, frames: Tensor) -> Tensor:
        """frames (B, Nf, 3, H, W), normalised RGB -> object feature (B, obj_dim)."""
        b, nf = frames.shape[:2]
        feats = self.proj(self.backbone(frames.flatten(0, 1)))  # (B * Nf, obj_dim)
        return feats.view(b, nf, -1).amax(dim=1)


class _Block3d(nn.Module):
    """Inflated residual block: two 3x3x3 convolutions, a strided 1x1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out))
        self.skip = nn.Identity() if c_in == c_out and stride == (1, 1, 1) else nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm3d(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, T, H, W) -> (B, C_out, T / st, H / ss, W / ss)."""
        return self.act(self.body(x) + self.skip(x))


class MotionEncoder(nn.Module):
    """Small I3D-style encoder of a crop tube: a 3-D stem and `n_stages` residual stages
    (channels doubling, space halved each stage, time halved from the second stage on), then
    spatial average pooling and a linear map per remaining time step.

    Input (B, 3, T, H, W) -> tokens (B, T / 2 ** (n_stages - 1), motion_dim).
    """

    def __init__(self, *, motion_dim: int = 512, base_channels: int = 32,
                 n_stages: int = 3) -> None:
        super().__init__()
        if n_stages < 1:
            raise ValueError(f"n_stages must be >= 1, got {n_stages}")
        self.kwargs = {"motion_dim": motion_dim, "base_channels": base_channels,
                       "n_stages": n_stages}
        self.time_stride = 2 ** (n_stages - 1)
        c = base_channels
        # The stem keeps time: motion is what this encoder is for.
        self.stem = nn.Sequential(
            nn.Conv3d(3, c, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(c), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
        stages = []
        for i in range(n_stages):
            c_out = base_channels * 2 ** i
            stride = (1, 1, 1) if i == 0 else (2, 2, 2)
            stages.append(_Block3d(c, c_out, stride))
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(c, motion_dim)

    def forward(self, tube: Tensor) -> Tensor:
        """tube (B, 3, T, H, W) -> motion tokens (B, T', motion_dim)."""
        h = self.stages(self.stem(tube))  # (B, C, T', H', W')
        return self.proj(h.mean(dim=(3, 4)).transpose(1, 2))
