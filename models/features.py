"""Per-track visual features: crops from boxes, the object feature and the motion tokens.

One implementation for the training feature cache (training/encoders.py) and the engine's
motion node, so that the separator sees the same kind of input offline and live: a change here
changes both, and the cached features of a trained bundle stay valid only while it does not.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

# Pixel normalisation of every crop (a scalar for all channels: the encoders are trained here
# from scratch on SynthMUSIC, not from ImageNet weights).
MEAN, STD = 0.45, 0.25


def crop_image(img: np.ndarray | Image.Image, box: np.ndarray, size: int,
               margin: float = 0.1) -> np.ndarray:
    """Crop of box (x1, y1, x2, y2) widened by `margin` of its width / height on each side,
    resized (bilinear, aspect not kept) to (size, size, 3) uint8. Parts outside the picture are
    black, so a box at the border keeps the instrument where it is in the crop."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img))
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    region = (x1 - margin * w, y1 - margin * h, x2 + margin * w, y2 + margin * h)
    return np.asarray(img.crop(tuple(round(v) for v in region)).resize((size, size),
                                                                       Image.BILINEAR))


def normalise(u8: np.ndarray) -> Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32, normalised."""
    x = torch.from_numpy(np.ascontiguousarray(u8)).float() / 255.0
    return ((x - MEAN) / STD).movedim(-1, -3)


def crop_boxes(frames: np.ndarray, boxes: np.ndarray, size: int, margin: float = 0.1) -> Tensor:
    """frames (T, H, W, 3) uint8 RGB, boxes (T, 4) in pixels (one per frame)
    -> normalised crops (T, 3, size, size)."""
    frames, boxes = np.asarray(frames), np.asarray(boxes, np.float32)
    assert frames.ndim == 4 and frames.shape[-1] == 3, f"frames must be (T,H,W,3), {frames.shape}"
    assert boxes.shape == (len(frames), 4), f"boxes must be (T,4), got {boxes.shape}"
    crops = [crop_image(f, b, size, margin) for f, b in zip(frames, boxes, strict=True)]
    return normalise(np.stack(crops))


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
