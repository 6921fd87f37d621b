"""Detector: target building, a loss that trains, and the ONNX output contract."""

import numpy as np
import onnx
import pytest
import torch

from training.detector import (
    OUTPUT_NAMES,
    CenterDetector,
    OnnxDetector,
    detector_loss,
    export_detector_onnx,
    make_targets,
)


def test_targets_peak_at_box_centre():
    heat, reg, mask = make_targets([np.array([[2, 32, 16, 64, 48]])], n_classes=4,
                                   in_size=64, img_size=64)
    assert heat.shape == (1, 4, 8, 8) and reg.shape == (1, 4, 8, 8)
    # centre (48, 32) px -> cell (x 5.5, y 3.5) - 0.5 -> rounds to (6, 4) or (5, 3)
    iy, ix = np.argwhere(mask[0].numpy())[0]
    assert heat[0, 2, iy, ix] == 1.0 and heat[0, [0, 1, 3]].max() == 0
    assert reg[0, 0, iy, ix] == pytest.approx(np.log(32))


def test_onnx_contract_matches_torch(tmp_path):
    torch.manual_seed(0)
    det = CenterDetector(n_classes=12, in_size=64, width=8, top_k=5).eval()
    path = export_detector_onnx(det, tmp_path / "det.onnx")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == OUTPUT_NAMES
    runner = OnnxDetector(path)
    imgs = (np.random.default_rng(0).random((3, 160, 120, 3)) * 255).astype(np.uint8)
    boxes, scores, cls = runner(imgs)  # another size than the export example: dynamic H, W
    assert boxes.shape == (3, 5, 4) and boxes.dtype == np.float32
    assert scores.shape == (3, 5) and scores.dtype == np.float32
    assert cls.shape == (3, 5) and cls.dtype == np.int64
    assert (np.diff(scores, axis=1) <= 1e-7).all(), "scores must be sorted high to low"
    assert ((cls >= 0) & (cls < 12)).all() and ((scores >= 0) & (scores <= 1)).all()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        tb, ts, _tc = det.decode(x)
    np.testing.assert_allclose(scores, ts.numpy(), atol=1e-5)
    np.testing.assert_allclose(boxes, tb.numpy(), atol=1e-3)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    det = CenterDetector(n_classes=3, in_size=64, width=8)
    img = torch.rand(2, 3, 64, 64)
    targets = make_targets([np.array([[1, 10, 10, 40, 40]]), np.array([[0, 20, 5, 60, 50]])],
                           3, 64, 64)
    opt = torch.optim.Adam(det.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = detector_loss(*det(img), *targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
