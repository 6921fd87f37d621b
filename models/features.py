"""Per-track visual features: crops from boxes, the object feature and the motion tokens.

One implementation for the training feature cache and the engine's motion node, so that the
separator sees the same kind of input offline and live.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ImageNet statistics: the ResNet-18 may be initialised from a user's torchvision weights.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def crop_boxes(frames: np.ndarray | Tensor, boxes: np.ndarray | Tensor, size: int,
               margin: float = 0.1) -> Tensor:
    """Square crops around boxes, resized and normalised.

    frames (T, H, W, 3) uint8 RGB, boxes (T, 4) x1, y1, x2, y2 in pixels (one box per frame)
    -> (T, 3, size, size) float32, ImageNet-normalised. A box is widened by `margin` of its side
    and made square (the instrument's aspect must not change with its pose), then clipped.
    """
    frames = torch.as_tensor(np.asarray(frames))
    boxes = torch.as_tensor(np.asarray(boxes), dtype=torch.float32)
    assert frames.ndim == 4 and frames.shape[-1] == 3, f"frames must be (T,H,W,3), {frames.shape}"
    assert boxes.shape == (frames.shape[0], 4), f"boxes must be (T,4), got {tuple(boxes.shape)}"
    h, w = frames.shape[1:3]
    out = []
    for img, (x1, y1, x2, y2) in zip(frames, boxes.tolist()):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = max(x2 - x1, y2 - y1, 2.0) * (1 + margin) / 2
        xa, xb = int(max(0, cx - half)), int(min(w, cx + half + 1))
        ya, yb = int(max(0, cy - half)), int(min(h, cy + half + 1))
        if xb - xa < 2 or yb - ya < 2:  # a box outside the picture: keep the tube's length
            xa, xb, ya, yb = 0, w, 0, h
        patch = img[ya:yb, xa:xb].permute(2, 0, 1)[None].float() / 255.0
        out.append(F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False))
    crops = torch.cat(out)
    return (crops - _MEAN) / _STD


@torch.no_grad()
def object_feature(encoder: nn.Module, crops: Tensor, n_frames: int = 3) -> Tensor:
    """crops (T, 3, S, S) of one track -> object feature (obj_dim,), max-pooled over
    `n_frames` frames spread evenly over the tube (the encoder pools them)."""
    idx = torch.linspace(0, crops.shape[0] - 1, min(n_frames, crops.shape[0])).round().long()
    dev = next(encoder.parameters()).device
    return encoder(crops[idx][None].to(dev))[0].cpu()


@torch.no_grad()
def motion_tokens(encoder: nn.Module, crops: Tensor) -> Tensor:
    """crops (T, 3, S, S) of one track -> motion tokens (T', motion_dim)."""
    dev = next(encoder.parameters()).device
    tube = crops.permute(1, 0, 2, 3)[None].to(dev)  # (1, 3, T, S, S)
    return encoder(tube)[0].cpu()
