"""A small CenterNet-style instrument detector (class heatmaps + box size + centre offset at
stride 8) and its ONNX export with a fixed output contract, so that any exported detector
(Faster R-CNN, Detic, ...) with the same contract can replace it:

    inputs : images    float32 (N, 3, H, W), RGB in [0, 1], any H, W
    outputs: boxes     float32 (N, K, 4)  x1, y1, x2, y2 in pixels of the input image
             scores    float32 (N, K)     in [0, 1], sorted high to low
             class_ids int64   (N, K)     vocabulary ids (instruments.toml order)

Peak extraction (3x3 max-pool "NMS") and top-K run inside the graph.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "class_ids"]


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class CenterDetector(nn.Module):
    """Images are resized to in_size x in_size inside the model; heads at stride 8.

    Dilated layers at the last stride widen the receptive field to the object's size
    (an instrument fills about 40% of a SynthMUSIC frame) without losing resolution.
    """

    def __init__(self, *, n_classes: int = 12, in_size: int = 96, width: int = 32,
                 top_k: int = 8) -> None:
        super().__init__()
        self.kwargs = {"n_classes": n_classes, "in_size": in_size, "width": width,
                       "top_k": top_k}
        self.n_classes, self.in_size, self.top_k = n_classes, in_size, top_k
        self.stride = 8
        w = width
        self.body = nn.Sequential(
            _conv(3, w // 2, 2), _conv(w // 2, w, 2), _conv(w, w), _conv(w, 2 * w, 2),
            _conv(2 * w, 2 * w), _conv(2 * w, 2 * w, dilation=2), _conv(2 * w, 2 * w, dilation=4))
        self.heat = nn.Sequential(_conv(2 * w, w), nn.Conv2d(w, n_classes, 1))
        self.size = nn.Sequential(_conv(2 * w, w), nn.Conv2d(w, 4, 1))  # log w, log h, dx, dy
        # Focal-loss prior: start every heatmap near 0.1 so early training is stable.
        nn.init.constant_(self.heat[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, 3, H, W) in [0, 1] -> (heatmap logits (N, C, S, S), regression
        (N, 4, S, S)) with S = in_size / 8; regression = (log w, log h, dx, dy) in model pixels
        (w, h) and cells (dx, dy)."""
        x = F.interpolate(images, size=(self.in_size, self.in_size), mode="bilinear",
                          align_corners=False)
        x = (x - 0.45) / 0.25
        h = self.body(x)
        return self.heat(h), self.size(h)

    def decode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images (N, 3, H, W) -> boxes (N, K, 4) input pixels, scores (N, K),
        class_ids (N, K) int64; the export contract."""
        logits, reg = self(images)
        heat = torch.sigmoid(logits)
        n, c, s, _ = heat.shape
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
        scores, idx = torch.topk(peaks.reshape(n, c * s * s), self.top_k, dim=1)
        class_ids = torch.div(idx, s * s, rounding_mode="floor")
        pos = idx - class_ids * (s * s)
        ys = torch.div(pos, s, rounding_mode="floor")
        xs = pos - ys * s
        reg = reg.reshape(n, 4, s * s)
        g = torch.gather(reg, 2, pos[:, None, :].expand(n, 4, self.top_k))  # (N, 4, K)
        bw, bh = torch.exp(g[:, 0]), torch.exp(g[:, 1])
        cx = (xs.to(heat.dtype) + 0.5 + g[:, 2]) * self.stride
        cy = (ys.to(heat.dtype) + 0.5 + g[:, 3]) * self.stride
        sx = images.shape[3] / self.in_size
        sy = images.shape[2] / self.in_size
        boxes = torch.stack([(cx - bw / 2) * sx, (cy - bh / 2) * sy,
                             (cx + bw / 2) * sx, (cy + bh / 2) * sy], dim=-1)
        return boxes, scores, class_ids


def make_targets(boxes: list[np.ndarray], n_classes: int, in_size: int, img_size: int,
                 stride: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Ground truth for a batch: boxes[i] (G, 5) rows [class_id, x1, y1, x2, y2] in pixels of
    an img_size square image -> heat (N, C, S, S) Gaussian peaks, reg (N, 4, S, S) targets,
    reg_mask (N, S, S) bool (True at object centres)."""
    s = in_size // stride
    n = len(boxes)
    heat = np.zeros((n, n_classes, s, s), np.float32)
    reg = np.zeros((n, 4, s, s), np.float32)
    mask = np.zeros((n, s, s), bool)
    scale = in_size / img_size
    yy, xx = np.mgrid[0:s, 0:s]
    for i, b in enumerate(boxes):
        for c, x1, y1, x2, y2 in np.asarray(b, np.float32).reshape(-1, 5):
            x1, y1, x2, y2 = x1 * scale, y1 * scale, x2 * scale, y2 * scale
            w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
            cx, cy = (x1 + x2) / 2 / stride - 0.5, (y1 + y2) / 2 / stride - 0.5
            ix, iy = int(np.clip(round(cx), 0, s - 1)), int(np.clip(round(cy), 0, s - 1))
            # CenterNet's size-adaptive Gaussian, simplified: sigma ~ object size / 6 cells.
            sigma = max(min(w, h) / stride / 6.0, 0.5)
            g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma ** 2))
            heat[i, int(c)] = np.maximum(heat[i, int(c)], g)
            reg[i, :, iy, ix] = (math.log(w), math.log(h), cx - ix, cy - iy)
            mask[i, iy, ix] = True
    return torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(mask)


def detector_loss(logits: Tensor, reg: Tensor, heat_t: Tensor, reg_t: Tensor,
                  reg_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """CenterNet focal loss (alpha 2, beta 4) on the heatmap + L1 on size/offset at centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat_t.eq(1).float()
    neg_w = (1 - heat_t).pow(4)
    pos_loss = (torch.log(p) * (1 - p).pow(2) * pos).sum()
    neg_loss = (torch.log(1 - p) * p.pow(2) * neg_w * (1 - pos)).sum()
    n_pos = pos.sum().clamp_min(1)
    focal = -(pos_loss + neg_loss) / n_pos
    m = reg_mask[:, None].expand_as(reg).float()
    l1 = (F.l1_loss(reg, reg_t, reduction="none") * m).sum() / m.sum().clamp_min(1)
    loss = focal + l1
    return loss, {"focal": focal.item(), "l1": l1.item()}


class _Export(nn.Module):
    def __init__(self, det: CenterDetector) -> None:
        super().__init__()
        self.det = det

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.det.decode(images)


def export_detector_onnx(det: CenterDetector, path: str | os.PathLike,
                         opset: int = 17) -> Path:
    """Write the detector with the contract of this module's docstring (N, H, W dynamic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = det.training
    det.eval()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with torch.no_grad():
            torch.onnx.export(
                _Export(det), (torch.rand(2, 3, 224, 224),), str(tmp), dynamo=False,
                opset_version=opset, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "boxes": {0: "n"},
                              "scores": {0: "n"}, "class_ids": {0: "n"}})
        os.replace(tmp, path)
    finally:
        det.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return path


class OnnxDetector:
    """Runs any detector ONNX file with the contract above (CPU provider by default)."""

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        if names[:3] != OUTPUT_NAMES:
            raise ValueError(f"{path}: outputs {names}; the detector contract needs "
                             f"{OUTPUT_NAMES}")

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images (N, H, W, 3) uint8 or (N, 3, H, W) float in [0, 1] -> boxes (N, K, 4),
        scores (N, K), class_ids (N, K)."""
        x = np.asarray(images)
        if x.dtype == np.uint8:
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        boxes, scores, cls = self.session.run(None, {"images": x.astype(np.float32)})
        return boxes, scores, cls
