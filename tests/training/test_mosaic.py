"""Mosaic augmentation of the detector's training frames: pixels and boxes move together."""

import numpy as np

from training.train_detector import mosaic


def test_mosaic_boxes_follow_their_pixels():
    rng = np.random.default_rng(0)
    size = 96
    images = np.zeros((3, size, size, 3), np.uint8)
    boxes = []
    for i in range(3):  # one solid square per frame, a distinct colour each
        x1, y1 = 20 + 10 * i, 30
        images[i, y1:y1 + 30, x1:x1 + 30] = 60 * (i + 1)
        boxes.append(np.array([[i, x1, y1, x1 + 30, y1 + 30]], np.float32))
    for _ in range(50):
        k = int(rng.integers(2, 4))
        picks = rng.choice(3, size=k, replace=False)
        out, out_boxes = mosaic(images, boxes, picks, rng)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert len(out_boxes) == k  # the squares' centres are always kept in their slot
        for cls, x1, y1, x2, y2 in out_boxes:
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            inside = out[int(y1) + 2:int(y2) - 2, int(np.ceil(x1)) + 1:int(x2) - 1, 0]
            assert inside.size and (inside == 60 * (int(cls) + 1)).mean() > 0.9
