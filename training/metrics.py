"""Evaluation metrics shared by the detector and the separator: VOC-style average precision
(all-point interpolation) / mAP@IoU, and BSS-eval SDR/SIR/SAR through mir_eval (plus
bss_eval_shared: the same numbers, ~3x faster, for the validation inside training)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.signal

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

    ref, est = _floored(references, estimates)
    sdr, sir, sar, _ = bss_eval_sources(ref, est, compute_permutation=False)
    return {"sdr": sdr, "sir": sir, "sar": sar}


BSS_FILTER_LEN = 512  # mir_eval's distortion filter length (bss_eval_sources' flen)


def _floored(references: np.ndarray, estimates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bss_eval's float64 copies, with a silent row replaced by a -100 dB noise floor."""
    ref = np.asarray(references, np.float64)
    est = np.asarray(estimates, np.float64)
    if ref.shape != est.shape or ref.ndim != 2:
        raise ValueError(f"references {ref.shape} and estimates {est.shape} must both be (K, N)")
    rng = np.random.default_rng(0)
    floor = 1e-5 * rng.standard_normal(ref.shape)
    ref = np.where(np.abs(ref).max(axis=1, keepdims=True) < 1e-8, floor, ref)
    est = np.where(np.abs(est).max(axis=1, keepdims=True) < 1e-8, floor[::-1], est)
    return ref, est


def _safe_db(num: float, den: float) -> float:
    return np.inf if den == 0 else float(10 * np.log10(num / den))


def bss_eval_shared(references: np.ndarray, estimates: np.ndarray) -> dict[str, np.ndarray]:
    """bss_eval's SDR/SIR/SAR, computed as mir_eval's bss_eval_sources does (no permutation,
    512-tap distortion filters), but with the work that does not depend on the estimate done
    once per mixture instead of once per source.

    mir_eval projects each estimate onto the delayed references by building the references'
    Gram matrix (K * 512 square) and solving it anew for every source: K LU factorisations of
    the same matrix, most of the time of a validation. Here the Gram matrix is built and
    factorised once and solved for all K estimates together; each source's own 512-square
    block is solved as mir_eval solves it. Agreement with mir_eval is checked in
    tests/training/test_metrics.py; training's validation uses this, reported results
    (training.evaluate) use mir_eval itself.
    """
    ref, est = _floored(references, estimates)
    k, n = ref.shape
    flen = BSS_FILTER_LEN
    n_fft = int(2 ** np.ceil(np.log2(n + flen - 1.0)))
    sf = np.fft.rfft(ref, n_fft, axis=1)
    ef = np.fft.rfft(est, n_fft, axis=1)
    lags = np.r_[0, -np.arange(1, flen)]  # lag 0, then -1 .. -(flen - 1): mir_eval's order

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # sum_t a[t + lag] b[t], by FFT
        return np.fft.irfft(a * np.conj(b), n_fft)

    gram = np.zeros((k * flen, k * flen))
    for i in range(k):
        for j in range(i, k):
            c = corr(sf[i], sf[j])
            block = scipy.linalg.toeplitz(c[lags], c[:flen])
            gram[i * flen:(i + 1) * flen, j * flen:(j + 1) * flen] = block
            gram[j * flen:(j + 1) * flen, i * flen:(i + 1) * flen] = block.T
    rhs = np.stack([np.concatenate([corr(sf[i], ef[e])[lags] for i in range(k)])
                    for e in range(k)], axis=1)  # (K * flen, K): one column per estimate
    try:  # one LU factorisation, K right-hand sides
        coef = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        coef = np.linalg.lstsq(gram, rhs, rcond=None)[0]

    def project(filters: np.ndarray, sources: np.ndarray) -> np.ndarray:
        return sum(scipy.signal.fftconvolve(f, s) for f, s in zip(filters, sources, strict=True))

    out = {"sdr": np.empty(k), "sir": np.empty(k), "sar": np.empty(k)}
    for j in range(k):
        s_true = np.concatenate([ref[j], np.zeros(flen - 1)])
        own = gram[j * flen:(j + 1) * flen, j * flen:(j + 1) * flen]
        try:
            c_own = np.linalg.solve(own, rhs[j * flen:(j + 1) * flen, j])
        except np.linalg.LinAlgError:
            c_own = np.linalg.lstsq(own, rhs[j * flen:(j + 1) * flen, j], rcond=None)[0]
        e_spat = project([c_own], ref[j:j + 1]) - s_true
        e_interf = project(coef[:, j].reshape(k, flen), ref) - s_true - e_spat
        e_artif = -s_true - e_spat - e_interf
        e_artif[:n] += est[j]
        s_filt = s_true + e_spat
        out["sdr"][j] = _safe_db(np.sum(s_filt ** 2), np.sum((e_interf + e_artif) ** 2))
        out["sir"][j] = _safe_db(np.sum(s_filt ** 2), np.sum(e_interf ** 2))
        out["sar"][j] = _safe_db(np.sum((s_filt + e_interf) ** 2), np.sum(e_artif ** 2))
    return out
