"""Whole-frame visual features: Sound-of-Pixels as published conditions each source on its
video's whole frame (a ResNet feature max-pooled over space and a few frames), not on a
detected player's crop. This writes a feature cache of that kind, in the layout of
training.encoders, so that `train.py --features` and `evaluate.py --features` train and score a
frame-level Sound-of-Pixels without code changes:

    python -m training.frame_features --data data/synth --out data/synth/features_frame

An ObjectEncoder (ResNet-18 + linear, as for crops) is pretrained as a classifier of whole
frames (label: the clip's sounding class; a quarter of SynthMUSIC's solo clips also show a
silent instrument, which a frame cannot tell apart from the player without localising it),
then each clip gets the max over the same OBJ_FRAMES frames as the crop features.
Motion tokens are copied from the crop cache (--crop-features) so every stem is complete;
Sound-of-Pixels ignores them. det/ holds the test solo clips again (a frame feature needs no
detector) where the crop cache has them, with its detector-named class ids (.cls.npy).
Ensembles are not written: every player of an ensemble shares one frame, so a frame-level
model has nothing to tell them apart by (score pairs only: evaluate --max-ensembles 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import save_checkpoint
from models.features import normalise
from models.visual import ObjectEncoder
from training.encoders import object_frame_ids, pretrain_object
from training.instruments import class_names
from training.music_data import Clip, MusicIndex
from training.visual_data import read_frame

FRAME_SIZE = 112  # whole frames resized to this (224-px frames at half resolution)


def frame_stack(clip: Clip, size: int = FRAME_SIZE) -> np.ndarray:
    """The clip's OBJ_FRAMES pooled frames, resized whole -> (OBJ_FRAMES, size, size, 3) uint8."""
    return np.stack([np.asarray(read_frame(clip.frames_dir, i).resize((size, size)))
                     for i in object_frame_ids(clip.n_frames)])


def copy_stem(src: Path, dst: Path, obj: np.ndarray, kinds: tuple[str, ...]) -> None:
    """Write obj as <dst>.obj.npy and copy <src>.<kind>.npy for each kind that exists."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.save(f"{dst}.obj.npy", obj.astype(np.float32))
    for kind in kinds:
        if Path(f"{src}.{kind}.npy").is_file():
            shutil.copyfile(f"{src}.{kind}.npy", f"{dst}.{kind}.npy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="SynthMUSIC (or MUSIC) root")
    ap.add_argument("--out", type=Path, required=True,
                    help="feature cache to write (e.g. <data>/features_frame)")
    ap.add_argument("--crop-features", type=Path, default=None,
                    help="the crop cache of training.encoders whose motion tokens and "
                         "detector class ids are copied (default <data>/features)")
    ap.add_argument("--encoder-out", type=Path, default=Path("runs/frame_encoder"),
                    help="where the frame classifier is saved (default runs/frame_encoder)")
    ap.add_argument("--steps", type=int, default=600,
                    help="frame classifier pretraining steps of batch 24 (default 600: a "
                         "player is a small part of a frame, so it needs more than the crop "
                         "encoder's 80)")
    ap.add_argument("--size", type=int, default=FRAME_SIZE,
                    help=f"frames resized to SIZE x SIZE (default {FRAME_SIZE})")
    ap.add_argument("--seed", type=int, default=0, help="default 0")
    args = ap.parse_args(argv)
    crop_feats = args.crop_features or args.data / "features"
    if not (crop_feats / "gt").is_dir():
        ap.error(f"no crop feature cache at {crop_feats}/gt: run python -m training.encoders")
    if args.steps < 1 or args.size < 32:
        ap.error("--steps must be >= 1 and --size >= 32")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    names = class_names()
    t0 = time.time()
    clips = {s: list(MusicIndex.from_csv(args.data / f"{s}.csv")) for s in ("train", "val",
                                                                              "test")}
    frames = [(s, c, frame_stack(c, args.size))
              for s, cl in clips.items() for c in tqdm(cl, desc=f"frames {s}", leave=False)]
    print(f"read {len(frames)} clips' frames in {time.time() - t0:.0f} s", flush=True)

    x = np.concatenate([f for s, _, f in frames if s == "train"])
    y = np.concatenate([[names.index(c.class_name)] * len(f) for s, c, f in frames
                        if s == "train"])
    enc = ObjectEncoder(obj_dim=512)
    acc, head = pretrain_object(enc, x, y, args.steps, min(24, len(x)), rng)
    enc.eval()
    with torch.no_grad():  # held out: is the frame classifier a fair visual front end?
        hits = [int(head(enc(normalise(f)[:, None])).argmax(1).mode().values)
                == names.index(c.class_name) for s, c, f in frames if s == "val"]
    val_acc = float(np.mean(hits))
    print(f"frame classifier: training accuracy {acc:.3f}, val clips {val_acc:.3f}", flush=True)
    meta = {"data": str(args.data), "frame_size": args.size, "train_accuracy": acc,
            "val_clip_accuracy": val_acc,
            "command": "python -m training.frame_features " + " ".join(sys.argv[1:])}
    save_checkpoint(args.encoder_out / "object_encoder", enc, meta)

    with torch.no_grad():
        for split, clip, stack in tqdm(frames, desc="features", leave=False):
            obj = enc(normalise(stack)[None])[0].numpy()
            stem = Path(clip.class_name) / clip.clip_id
            copy_stem(crop_feats / "gt" / stem, args.out / "gt" / stem, obj, ("motion",))
            if split == "test" and Path(f"{crop_feats / 'det' / stem}.motion.npy").is_file():
                copy_stem(crop_feats / "det" / stem, args.out / "det" / stem, obj,
                          ("motion", "cls"))
    summary = {"frame_classifier_train_accuracy": acc, "frame_classifier_val_accuracy": val_acc,
               "frame_size": args.size,
               "crop_features": str(crop_feats), "seconds": round(time.time() - t0, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"frame features of {len(frames)} clips in {args.out} ({time.time() - t0:.0f} s); "
          f"classifier accuracy {acc:.3f} training, {val_acc:.3f} val clips", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
