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
from training.metrics import mean_average_precision
from training.music_data import MusicIndex, list_ensembles, load_boxes
from training.visual_data import read_frame

N_CLASSES = 12


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames-per-clip", type=int, default=4)
    ap.add_argument("--in-size", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
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
        x = torch.from_numpy(train_imgs[idx]).permute(0, 3, 1, 2).float() / 255.0
        bxs = [train_boxes[i].copy() for i in idx]
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
    (args.out / "detector_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("ap50")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
