"""Evaluation metrics shared by the detector and the separator: VOC-style average precision
(all-point interpolation) / mAP@IoU, and BSS-eval SDR/SIR/SAR through mir_eval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.boxes import box_iou


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010+ all-point interpolated AP: area under the precision envelope (precision made
    monotonically non-increasing from the right), summed where recall changes."""
    mrec = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    mpre = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def mean_average_precision(detections: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray],
                           n_classes: int, iou_threshold: float = 0.5
                           ) -> tuple[float, dict[int, float]]:
    """mAP over images, VOC-style.

    detections[i]: (D, 6) rows [class_id, score, x1, y1, x2, y2] of image i;
    ground_truth[i]: (G, 5) rows [class_id, x1, y1, x2, y2]. A detection is a true positive when
    its IoU with a not-yet-matched ground-truth box of its class is >= iou_threshold (greedy in
    score order, as VOC). Classes with no ground truth are left out of the mean.
    Returns (mAP, {class_id: AP}).
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists but {len(ground_truth)} "
                         "ground-truth lists; need one of each per image")
    aps: dict[int, float] = {}
    for c in range(n_classes):
        gts = [np.asarray(g, np.float64).reshape(-1, 5) for g in ground_truth]
        gts = [g[g[:, 0] == c, 1:] for g in gts]
        n_gt = sum(len(g) for g in gts)
        if n_gt == 0:
            continue
        rows = []  # (score, image, box)
        for i, d in enumerate(detections):
            d = np.asarray(d, np.float64).reshape(-1, 6)
            for r in d[d[:, 0] == c]:
                rows.append((r[1], i, r[2:6]))
        rows.sort(key=lambda r: -r[0])
        used = [np.zeros(len(g), bool) for g in gts]
        tp = np.zeros(len(rows))
        for k, (_, i, box) in enumerate(rows):
            if len(gts[i]) == 0:
                continue
            iou = box_iou(box[None], gts[i])[0]
            j = int(np.argmax(iou))
            if iou[j] >= iou_threshold and not used[i][j]:
                used[i][j] = True
                tp[k] = 1
        ctp = np.cumsum(tp)
        recall = ctp / n_gt
        precision = ctp / np.arange(1, len(rows) + 1) if rows else np.zeros(0)
        aps[c] = average_precision(recall, precision)
    m = float(np.mean(list(aps.values()))) if aps else 0.0
    return m, aps


def bss_eval(references: np.ndarray, estimates: np.ndarray) -> dict[str, np.ndarray]:
    """SDR/SIR/SAR (mir_eval.separation.bss_eval_sources, no permutation: estimate k is scored
    against reference k). references, estimates: (K, N) -> {"sdr": (K,), "sir": ..., "sar": ...}.

    A silent reference or estimate makes BSS-eval undefined; a tiny noise floor (-100 dB) is
    added so such a source scores very low instead of raising.
    """
    from mir_eval.separation import bss_eval_sources

    ref = np.asarray(references, np.float64)
    est = np.asarray(estimates, np.float64)
    if ref.shape != est.shape or ref.ndim != 2:
        raise ValueError(f"references {ref.shape} and estimates {est.shape} must both be (K, N)")
    rng = np.random.default_rng(0)
    floor = 1e-5 * rng.standard_normal(ref.shape)
    ref = np.where(np.abs(ref).max(axis=1, keepdims=True) < 1e-8, floor, ref)
    est = np.where(np.abs(est).max(axis=1, keepdims=True) < 1e-8, floor[::-1], est)
    sdr, sir, sar, _ = bss_eval_sources(ref, est, compute_permutation=False)
    return {"sdr": sdr, "sir": sir, "sar": sar}
