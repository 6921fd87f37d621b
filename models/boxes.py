"""Box geometry shared by the detector's tracker (nodes/) and its evaluation (training/).

NumPy only: the detector node runs onnxruntime and should not pay for importing torch.
"""

from __future__ import annotations

import numpy as np


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes a (N, 4), b (M, 4) -> intersection areas (N, M), areas of a (N,) and of b (M,)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter, area_a, area_b


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (N, 4) and b (M, 4), x1 y1 x2 y2 pixels -> (N, M); 0 for empty unions."""
    inter, area_a, area_b = _overlap(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def box_cover(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the smaller box's area of boxes a (N, 4) and b (M, 4) -> (N, M):
    1 when one box lies inside the other, whatever their sizes (IoU is low then)."""
    inter, area_a, area_b = _overlap(a, b)
    smaller = np.minimum(area_a[:, None], area_b[None, :])
    return np.where(smaller > 0, inter / np.maximum(smaller, 1e-12), 0.0)
