"""mAP (VOC all-point interpolation) on hand-made cases, BSS-eval wrapper sanity."""

import numpy as np
import pytest

from training.metrics import (
    average_precision,
    box_iou,
    bss_eval,
    bss_eval_shared,
    mean_average_precision,
)


def test_box_iou_hand_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0])


def test_average_precision_all_point_interpolation():
    # Ranked hits: TP, FP, TP with 2 ground truths -> recall .5 .5 1, precision 1 .5 .667.
    # Envelope: precision 1 up to recall .5, then .667 up to 1 -> AP = .5 + .5 * 2/3.
    ap = average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_map_hand_case():
    gt = [np.array([[0, 0, 0, 10, 10], [1, 20, 20, 40, 40]]),
          np.array([[0, 50, 50, 60, 60]])]
    dets = [np.array([[0, 0.9, 0, 0, 10, 10],      # TP class 0
                      [0, 0.8, 1, 1, 11, 11],      # duplicate of a matched box: FP
                      [1, 0.7, 20, 20, 40, 40]]),  # TP class 1
            np.array([[0, 0.6, 50, 50, 60, 60],    # TP class 0
                      [1, 0.95, 0, 0, 5, 5]])]     # FP class 1 (no class-1 box here)
    m, aps = mean_average_precision(dets, gt, n_classes=3)
    # class 0: TP FP TP over 2 gts -> 0.5 + 0.5 * 2/3; class 1: FP then TP -> 0.5.
    assert aps[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert aps[1] == pytest.approx(0.5)
    assert 2 not in aps  # no ground truth: not averaged
    assert m == pytest.approx((aps[0] + aps[1]) / 2)


def test_map_perfect_and_mismatched_lengths():
    gt = [np.array([[3, 0, 0, 10, 10]])]
    assert mean_average_precision([np.array([[3, 1.0, 0, 0, 10, 10]])], gt, 12)[0] == 1.0
    with pytest.raises(ValueError, match="one of each per image"):
        mean_average_precision([], gt, 12)


def test_bss_eval_orders_estimates():
    rng = np.random.default_rng(0)
    refs = rng.standard_normal((2, 8000))
    good = bss_eval(refs, refs + 0.01 * rng.standard_normal(refs.shape))
    bad = bss_eval(refs, refs + 0.5 * refs[::-1])
    assert (good["sdr"] > 30).all()
    assert (good["sdr"] > bad["sdr"] + 10).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bss_eval_shared_matches_mir_eval(k):
    """The validation's faster BSS-eval gives mir_eval's numbers: on estimates that leak the
    other sources, are filtered (a short FIR, which the 512-tap projection absorbs) and
    carry noise, and with a silent reference (the noise-floor path)."""
    rng = np.random.default_rng(k)
    refs = rng.standard_normal((k, 6000)) * np.linspace(0.2, 1.0, 6000)
    est = refs + 0.3 * refs[::-1] + 0.1 * rng.standard_normal(refs.shape)
    est[0] = np.convolve(est[0], [1.0, 0.5, -0.2])[:6000]
    cases = [refs]
    if k > 1:
        silent = refs.copy()
        silent[-1] = 0.0
        cases.append(silent)
    for r in cases:
        want, got = bss_eval(r, est), bss_eval_shared(r, est)
        for key in ("sdr", "sir", "sar"):
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="must both be"):
        bss_eval_shared(refs, est[:, :100])
