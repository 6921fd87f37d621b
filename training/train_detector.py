"""Train the small CenterNet-style detector on SynthMUSIC frames with their ground-truth boxes,
report mAP@0.5 (VOC all-point) on test frames through the exported ONNX file, and write
<out>/detector.onnx + detector.safetensors/.json + detector_metrics.json.

    python -m training.train_detector --data data/synth --out runs/detector --steps 600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from training.detector import (
    CenterDetector,
    OnnxDetector,
    detector_loss,
    export_detector_onnx,
    make_targets,
)
from training.instruments import class_names
from training.metrics import mean_average_precision
from training.music_data import MusicIndex, list_ensembles, load_boxes
from training.visual_data import name_clip, read_frame

N_CLASSES = len(class_names())  # the vocabulary of ../shared/instruments.toml


def load_frames_with_boxes(items: list[tuple[Path, np.ndarray, int]], per_clip: int, size: int,
                           rng: np.random.Generator | None) -> tuple[np.ndarray, list, int]:
    """items: (frames_dir, rows, n_frames). per_clip frames each (random if rng else evenly
    spaced) -> images (N, size, size, 3) uint8, boxes per image (G, 5) in `size` pixels,
    the original frame side."""
    images, boxes = [], []
    orig = 224
    for frames_dir, rows, n in items:
        if rng is not None:
            ids = rng.choice(np.arange(1, n + 1), size=min(per_clip, n), replace=False)
        else:
            ids = np.linspace(1, n, per_clip).round().astype(int)
        for i in ids:
            img = read_frame(frames_dir, int(i))
            orig = img.size[0]
            images.append(np.asarray(img.resize((size, size))))
            r = rows[rows[:, 0] == i]
            boxes.append(np.concatenate([r[:, 1:2], r[:, 3:7] * size / orig], axis=1))
    return np.stack(images), boxes, orig


def mosaic(images: np.ndarray, boxes: list, picks: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Compose len(picks) (2 or 3) training frames side by side into one (S, S, 3) uint8 frame:
    each source is cropped to a random horizontal window that holds all its boxes' centres
    (when they fit), then squeezed into its S/k-wide slot. Returns the frame and its (G, 5)
    boxes (class, x1, y1, x2, y2) in the mosaic's pixels; boxes cut to under 40% of their
    width are dropped (an unrecognisable sliver should not be a positive)."""
    size = images.shape[1]
    k = len(picks)
    edges = np.linspace(0, size, k + 1).round().astype(int)
    out = np.empty_like(images[0])
    out_boxes = []
    for slot, i in enumerate(picks):
        img, b = images[i], boxes[i]
        slot_w = edges[slot + 1] - edges[slot]
        # Crop width between the slot's own aspect (no squeeze) and the full frame (squeeze k x)
        # so that players appear both narrowed, as in ensemble shots, and at natural shape.
        crop_w = int(rng.integers(slot_w, size + 1))
        cx = (b[:, 1] + b[:, 3]) / 2 if len(b) else np.array([size / 2])
        lo = max(0, int(np.ceil(cx.max())) - crop_w)
        hi = min(size - crop_w, int(cx.min()))
        x0 = int(rng.integers(lo, hi + 1)) if hi >= lo else int(rng.integers(0, size - crop_w + 1))
        crop = img[:, x0:x0 + crop_w]
        cols = np.minimum((np.arange(slot_w) + 0.5) * crop_w / slot_w, crop_w - 1).astype(int)
        out[:, edges[slot]:edges[slot + 1]] = crop[:, cols]  # nearest-neighbour resample
        if len(b):
            x1 = np.clip(b[:, 1] - x0, 0, crop_w)
            x2 = np.clip(b[:, 3] - x0, 0, crop_w)
            keep = (x2 - x1) >= 0.4 * (b[:, 3] - b[:, 1])
            scale = slot_w / crop_w
            nb = b[keep].copy()
            nb[:, 1] = edges[slot] + x1[keep] * scale
            nb[:, 3] = edges[slot] + x2[keep] * scale
            out_boxes.append(nb)
    return out, (np.concatenate(out_boxes) if out_boxes else np.zeros((0, 5)))


def solo_items(data: Path, split: str) -> list[tuple[Path, np.ndarray, int]]:
    return [(c.frames_dir, load_boxes(c), c.n_frames)
            for c in MusicIndex.from_csv(data / f"{split}.csv")]


def evaluate_map(onnx_path: Path, images: np.ndarray, boxes: list) -> tuple[float, dict]:
    """mAP@0.5 of the ONNX detector on uint8 images with (G, 5) ground truth."""
    det = OnnxDetector(onnx_path)
    dets = []
    for a in range(0, len(images), 32):
        b, s, c = det(images[a:a + 32])
        for j in range(len(b)):
            dets.append(np.concatenate([c[j][:, None], s[j][:, None], b[j]], axis=1))
    return mean_average_precision(dets, boxes, N_CLASSES, 0.5)


def naming_scores(onnx_path: Path, data: Path) -> dict[str, float]:
    """How often the detector names test clips right, with the rule that makes detector-named
    queries (training.visual_data.name_clip): solo clips by their one class, ensembles by
    their exact set of classes (a missed or an extra player makes the clip wrong)."""
    det = OnnxDetector(onnx_path)
    names = class_names()
    solo = list(MusicIndex.from_csv(data / "test.csv"))
    ok = sum(name_clip(det, c.frames_dir, c.n_frames, solo=True)[0][:1] ==
             [names.index(c.class_name)] for c in solo)
    out = {"naming_accuracy_test_solo": ok / max(len(solo), 1)}
    ens = list_ensembles(data)
    if ens:
        exact = sum(sorted(names[i] for i in name_clip(det, e.frames_dir, e.n_frames,
                                                       solo=False)[0]) == sorted(e.classes)
                    for e in ens)
        out["ensembles_exact_class_set"] = exact / len(ens)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Train the small CenterNet-style instrument detector on SynthMUSIC (or "
                    "MUSIC-layout) training frames and their boxes, export it to ONNX (the "
                    "contract of docs/DETECTOR.md) and score it on the test frames: mAP@0.5 "
                    "and how often it names each clip's instruments right.")
    ap.add_argument("--data", type=Path, required=True,
                    help="dataset root with train.csv / test.csv, frames and "
                         "detection_results (training.synth writes one)")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for detector.onnx, detector.safetensors/.json and "
                         "detector_metrics.json")
    ap.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    ap.add_argument("--batch", type=int, default=16, help="frames per step (default 16)")
    ap.add_argument("--frames-per-clip", type=int, default=4,
                    help="training frames drawn from each solo clip (default 4)")
    ap.add_argument("--in-size", type=int, default=192,
                    help="side of the square the graph resizes every image to, a multiple of "
                         "8 (default 192: players in ensemble frames are ~50 px of 224; "
                         "96 loses them, docs/RESULTS.md section 24)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak Adam LR, one-cycle (2e-3)")
    ap.add_argument("--mosaic", type=float, default=0.5,
                    help="fraction of each batch replaced by 2-3-frame mosaics of training frames")
    ap.add_argument("--seed", type=int, default=0, help="weights and sampling (default 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
    if args.in_size < 32 or args.in_size % 8:
        ap.error(f"--in-size {args.in_size}: must be a multiple of 8, at least 32 (the heads "
                 "sit at stride 8)")
    if not (args.data / "train.csv").is_file():
        ap.error(f"--data {args.data}: no train.csv there (make a dataset with "
                 "python -m training.synth)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    size = args.in_size
    train_imgs, train_boxes, orig = load_frames_with_boxes(
        solo_items(args.data, "train"), args.frames_per_clip, size, rng)
    print(f"loaded {len(train_imgs)} training frames in {time.time() - t0:.0f} s", flush=True)

    det = CenterDetector(n_classes=N_CLASSES, in_size=size)
    opt = torch.optim.Adam(det.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    det.train()
    t1 = time.time()
    for step in range(args.steps):
        idx = rng.choice(len(train_imgs), size=args.batch, replace=False)
        batch_imgs = train_imgs[idx].copy()
        bxs = [train_boxes[i].copy() for i in idx]
        # Mosaics of training frames only: the detector must see 2-3 players per frame, as
        # in ensembles, without ever training on ensemble or test clips.
        for j in np.where(rng.random(args.batch) < args.mosaic)[0]:
            picks = rng.choice(len(train_imgs), size=int(rng.integers(2, 4)), replace=False)
            batch_imgs[j], bxs[j] = mosaic(train_imgs, train_boxes, picks, rng)
        x = torch.from_numpy(batch_imgs).permute(0, 3, 1, 2).float() / 255.0
        flip = rng.random(args.batch) < 0.5
        for j in np.where(flip)[0]:  # horizontal flip: the class stays, the box mirrors
            x[j] = x[j].flip(-1)
            b = bxs[j]
            b[:, [1, 3]] = size - b[:, [3, 1]]
        x = (x * torch.empty(args.batch, 1, 1, 1).uniform_(0.7, 1.3)).clamp(0, 1)
        heat_t, reg_t, mask = make_targets(bxs, N_CLASSES, size, size)
        logits, reg = det(x)
        loss, parts = detector_loss(logits, reg, heat_t, reg_t, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} focal {parts['focal']:.3f} "
                  f"l1 {parts['l1']:.3f} ({time.time() - t1:.0f} s)", flush=True)
    train_s = time.time() - t1

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_detector_onnx(det, args.out / "detector.onnx")
    save_file({k: v.contiguous() for k, v in det.state_dict().items()},
              str(args.out / "detector.safetensors"))
    (args.out / "detector.json").write_text(json.dumps(
        {"class": "CenterDetector", "kwargs": det.kwargs}, indent=2) + "\n")

    # Test frames at their stored size: the ONNX graph resizes them itself.
    test_imgs, test_boxes, _ = load_frames_with_boxes(solo_items(args.data, "test"), 3, orig,
                                                      None)
    m_solo, ap_solo = evaluate_map(onnx_path, test_imgs, test_boxes)
    ens = [(e.frames_dir, load_boxes(e.boxes_path), e.n_frames) for e in list_ensembles(args.data)]
    metrics = {"map50_test_solo": m_solo, "ap50_test_solo": ap_solo,
               "n_test_solo_frames": len(test_imgs), "train_frames": len(train_imgs),
               "steps": args.steps, "batch": args.batch, "in_size": size,
               "train_seconds": round(train_s, 1),
               "command": "python -m training.train_detector " + " ".join(sys.argv[1:])}
    if ens:
        e_imgs, e_boxes, _ = load_frames_with_boxes(ens, 2, orig, None)
        m_ens, ap_ens = evaluate_map(onnx_path, e_imgs, e_boxes)
        metrics |= {"map50_ensembles": m_ens, "ap50_ensembles": ap_ens,
                    "n_ensemble_frames": len(e_imgs)}
    metrics |= naming_scores(onnx_path, args.data)
    (args.out / "detector_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("ap50")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
