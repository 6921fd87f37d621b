"""Pretrain the frozen visual encoders and cache their features beside the data (as the paper
does): the ObjectEncoder as an instrument classifier on ground-truth crops, the MotionEncoder
self-supervised (regress the clip's own audio loudness per video frame from its crop tube: no
human labels), then per clip an object feature (max over a few frames) and one motion token per
video frame, as .npy under <features>/<gt|det>/...

    python -m training.encoders --data data/synth --detector runs/detector/detector.onnx

Layout: <features>/gt/<class>/<clip_id>.obj.npy (obj_dim,) and .motion.npy (n_frames, dim)
float16; <features>/det/<class>/<clip_id>.* for test clips with .cls.npy (the detector-named
class id); ensembles under <features>/<gt|det>/ensembles/<ens_id>/<class>.obj.npy / .motion.npy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.checkpoint import load_checkpoint, save_checkpoint
from models.features import MEAN, STD, normalise
from models.visual import MotionEncoder, ObjectEncoder
from training.instruments import class_names
from training.music_data import Clip, MusicIndex, list_ensembles, load_audio, load_boxes
from training.visual_data import crop, name_clip, read_frame, track_from_rows

OBJ_CROP = 64
MOTION_CROP = 40
OBJ_FRAMES = 3  # frames per clip whose features are max-pooled (ObjectEncoder.forward)
OBJ_MARGIN = 0.1
MOTION_MARGIN = 0.25  # a still crop must hold the instrument's swing


def object_frame_ids(n_frames: int) -> list[int]:
    """The OBJ_FRAMES 1-based frames, evenly inside the clip, whose object features are pooled."""
    return np.linspace(1, n_frames, OBJ_FRAMES + 2)[1:-1].round().astype(int).tolist()


def track_crops(frames_dir: Path, track: np.ndarray, n_frames: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """All-frame motion crops (n_frames, MC, MC, 3) and OBJ_FRAMES object crops of a track."""
    obj_ids = set(object_frame_ids(n_frames))
    # The tube is cut at the track's median box, as the engine's detector refreshes its box
    # only every ~1 s: the instrument's own movement stays visible inside a still crop.
    still = np.median(track, axis=0)
    tube, objs = [], []
    for i in range(1, n_frames + 1):
        img = read_frame(frames_dir, i)
        tube.append(crop(img, still, MOTION_CROP, MOTION_MARGIN))
        if i in obj_ids:
            objs.append(crop(img, track[i - 1], OBJ_CROP, OBJ_MARGIN))
    return np.stack(tube), np.stack(objs)


def loudness_target(clip: Clip, n_frames: int, fps: float) -> np.ndarray:
    """RMS of the clip's audio around each video frame's time, over its 95th percentile and
    clipped to [0, 1] (playing vs resting): (n_frames,)."""
    wave = load_audio(clip)
    half = int(11025 / fps / 2)
    centres = (np.arange(n_frames) / fps * 11025).astype(int)
    env = np.array([np.sqrt(np.mean(wave[max(0, c - half):c + half] ** 2) + 1e-12)
                    for c in centres])
    return np.clip(env / max(np.percentile(env, 95), 1e-9), 0, 1).astype(np.float32)


def pretrain_object(enc: ObjectEncoder, crops: np.ndarray, labels: np.ndarray, steps: int,
                    batch: int, rng: np.random.Generator) -> tuple[float, nn.Linear]:
    """Classifier pretraining; returns the last-50-step training accuracy and the classifier
    head (for a held-out accuracy)."""
    head = nn.Linear(enc.kwargs["obj_dim"], len(class_names()))
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
    enc.train()
    accs = []
    for step in range(steps):
        idx = rng.choice(len(crops), size=batch, replace=False)
        x = normalise(crops[idx])
        if rng.random() < 0.5:
            x = x.flip(-1)
        logits = head(enc(x[:, None]))
        y = torch.from_numpy(labels[idx]).long()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        accs.append(float((logits.argmax(1) == y).float().mean()))
        if step % 20 == 0:
            print(f"object step {step} loss {loss.item():.3f} acc {np.mean(accs[-20:]):.2f}",
                  flush=True)
    return float(np.mean(accs[-50:])), head


def pretrain_motion(enc: MotionEncoder, tubes: list[np.ndarray], targets: list[np.ndarray],
                    steps: int, batch: int, length: int, rng: np.random.Generator) -> float:
    """Self-supervised: predict per-frame loudness from the tube. Returns the last-50-step
    Pearson correlation between prediction and target."""
    head = nn.Linear(enc.kwargs["motion_dim"], 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
    enc.train()
    corrs = []
    for step in range(steps):
        xs, ys = [], []
        for i in rng.choice(len(tubes), size=batch, replace=False):
            a = int(rng.integers(0, len(tubes[i]) - length + 1))
            xs.append(tubes[i][a:a + length])
            ys.append(targets[i][a:a + length])
        x = normalise(np.stack(xs)).transpose(1, 2)  # (B, 3, T, H, W)
        y = torch.from_numpy(np.stack(ys))
        pred = head(enc(x))[..., 0]  # (B, T)
        loss = F.mse_loss(pred, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        p, t = pred.detach().flatten(), y.flatten()
        corrs.append(float(torch.corrcoef(torch.stack([p, t]))[0, 1]))
        if step % 20 == 0:
            print(f"motion step {step} loss {loss.item():.3f} corr {np.mean(corrs[-20:]):.2f}",
                  flush=True)
    return float(np.mean(corrs[-50:]))


@torch.no_grad()
def encode(obj_enc: ObjectEncoder, mot_enc: MotionEncoder, tube: np.ndarray, objs: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """-> object feature (obj_dim,) float32, motion tokens (n_frames, motion_dim) float16."""
    obj = obj_enc(normalise(objs)[None])[0].numpy()
    motion = mot_enc(normalise(tube)[None].transpose(1, 2))[0].numpy().astype(np.float16)
    return obj, motion


def save_feats(stem: Path, obj: np.ndarray, motion: np.ndarray,
               cls: int | None = None) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.save(f"{stem}.obj.npy", obj.astype(np.float32))
    np.save(f"{stem}.motion.npy", motion)
    if cls is not None:
        np.save(f"{stem}.cls.npy", np.array(cls, np.int64))


def cache_detector_features(detector: Path, obj_enc: ObjectEncoder, mot_enc: MotionEncoder,
                            test_clips: list[Clip], ensembles: list, feats: Path,
                            names: list[str], t0: float) -> dict:
    """Detector-named features under <feats>/det: each test solo clip named by its most
    confident detected class, each ensemble by every class detected in >= half of the sampled
    frames. -> naming summary."""
    from training.detector import OnnxDetector

    det = OnnxDetector(detector)
    stride = 2
    named_ok = 0
    for c in tqdm(test_clips, desc="det solo", unit="clip", leave=False):
        found, rows = name_clip(det, c.frames_dir, c.n_frames, solo=True, stride=stride)
        cls = found[0] if found else 0
        named_ok += names[cls] == c.class_name
        track = track_from_rows(rows, cls, c.n_frames)
        if track is None:  # nothing detected at all: the whole frame is the crop
            track = np.tile(np.array([0, 0, 224, 224], np.float32), (c.n_frames, 1))
        tube, objs = track_crops(c.frames_dir, track, c.n_frames)
        save_feats(feats / "det" / c.class_name / c.clip_id,
                   *encode(obj_enc, mot_enc, tube, objs), cls=cls)
    ens_found = {}
    for e in tqdm(ensembles, desc="det ensembles", unit="clip", leave=False):
        found, rows = name_clip(det, e.frames_dir, e.n_frames, solo=False, stride=stride)
        ens_found[e.clip_id] = [names[c] for c in found]
        out = feats / "det" / "ensembles" / e.clip_id
        for stale in out.glob("*.npy") if out.is_dir() else ():  # a re-run with a new detector
            stale.unlink()
        for cls in found:
            track = track_from_rows(rows, cls, e.n_frames)
            tube, objs = track_crops(e.frames_dir, track, e.n_frames)
            save_feats(out / names[cls], *encode(obj_enc, mot_enc, tube, objs))
    exact = sum(sorted(v) == sorted(e.classes) for e, v in
                zip(ensembles, ens_found.values(), strict=True))
    summary = {"detector": str(detector),
               "det_naming_accuracy_test_solo": named_ok / max(len(test_clips), 1),
               "det_ensembles_exact_class_set": exact / max(len(ensembles), 1),
               "det_ensemble_classes": ens_found}
    print(f"cached detector-named features ({time.time() - t0:.0f} s): naming accuracy "
          f"{summary['det_naming_accuracy_test_solo']:.3f}, ensembles exact "
          f"{summary['det_ensembles_exact_class_set']:.3f}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="SynthMUSIC (or MUSIC) root")
    ap.add_argument("--features", type=Path, default=None, help="default: <data>/features")
    ap.add_argument("--encoders-out", type=Path, default=Path("runs/encoders"),
                    help="where pretrained encoders are saved (default runs/encoders)")
    ap.add_argument("--detector", type=Path, default=None, help="ONNX detector for det/")
    ap.add_argument("--obj-steps", type=int, default=80,
                    help="ObjectEncoder pretraining steps (default 80)")
    ap.add_argument("--motion-steps", type=int, default=500,
                    help="MotionEncoder self-supervised pretraining steps (default 500)")
    ap.add_argument("--motion-dim", type=int, default=512,
                    help="motion token width (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="default 0")
    ap.add_argument("--object-encoder", type=Path, default=None,
                    help="use this ObjectEncoder checkpoint instead of pretraining one (not "
                         "saved again)")
    ap.add_argument("--motion-encoder", type=Path, default=None,
                    help="use this MotionEncoder checkpoint instead of pretraining one, e.g. "
                         "one trained end to end with the separator (train.py --motion-e2e)")
    ap.add_argument("--tubes", action="store_true",
                    help="also cache every ground-truth solo clip's motion crop tube as "
                         "<stem>.tube.npy (n_frames, 40, 40, 3) uint8, the input of "
                         "train.py --motion-e2e")
    ap.add_argument("--det-only", action="store_true",
                    help="only re-cache det/ with --detector, using the encoders already in "
                         "--encoders-out (after a new detector; gt/ and the separators that "
                         "were trained on it stay valid)")
    args = ap.parse_args(argv)
    feats = args.features or args.data / "features"
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    names = class_names()
    t0 = time.time()
    if args.det_only:
        if args.detector is None:
            ap.error("--det-only needs --detector")
        obj_enc, _ = load_checkpoint(args.encoders_out / "object_encoder")
        mot_enc, _ = load_checkpoint(args.encoders_out / "motion_encoder")
        test = list(MusicIndex.from_csv(args.data / "test.csv"))
        summary_path = feats / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary |= cache_detector_features(args.detector, obj_enc, mot_enc, test,
                                           list_ensembles(args.data), feats, names, t0)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        return 0

    # Ground-truth tracks of every solo clip (the sounding class only).
    clips = {s: list(MusicIndex.from_csv(args.data / f"{s}.csv")) for s in ("train", "val",
                                                                              "test")}
    crops: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, cl in clips.items():
        for c in cl:
            track = track_from_rows(load_boxes(c), names.index(c.class_name), c.n_frames)
            if track is None:
                raise ValueError(f"{c.clip_id}: no ground-truth box of class {c.class_name}")
            crops[f"{split}/{c.clip_id}"] = track_crops(c.frames_dir, track, c.n_frames)
    print(f"cropped {len(crops)} clips in {time.time() - t0:.0f} s", flush=True)

    train = clips["train"]
    meta = {"data": str(args.data),
            "command": "python -m training.encoders " + " ".join(sys.argv[1:]),
            "obj_crop": OBJ_CROP,
            "motion_crop": MOTION_CROP, "obj_frames": OBJ_FRAMES, "normalise": [MEAN, STD]}
    # A given encoder is used as it is; only the ones trained here are saved.
    if args.object_encoder is not None:
        obj_enc, obj_meta = load_checkpoint(args.object_encoder)
        obj_acc = obj_meta.get("train_accuracy")
    else:
        obj_x = np.concatenate([crops[f"train/{c.clip_id}"][1] for c in train])
        obj_y = np.concatenate([[names.index(c.class_name)] * OBJ_FRAMES for c in train])
        obj_enc = ObjectEncoder(obj_dim=512)
        obj_acc, _ = pretrain_object(obj_enc, obj_x, obj_y, args.obj_steps,
                                     min(24, len(obj_x)), rng)
        save_checkpoint(args.encoders_out / "object_encoder", obj_enc.eval(),
                        meta | {"train_accuracy": obj_acc})
    if args.motion_encoder is not None:
        mot_enc, mot_meta = load_checkpoint(args.motion_encoder)
        mot_corr = mot_meta.get("train_loudness_corr")
    else:
        mot_enc = MotionEncoder(motion_dim=args.motion_dim, base_channels=16, n_stages=1)
        tubes = [crops[f"train/{c.clip_id}"][0] for c in train]
        targets = [loudness_target(c, c.n_frames, c.fps) for c in train]
        length = min(16, min(len(t) for t in tubes))
        mot_corr = pretrain_motion(mot_enc, tubes, targets, args.motion_steps,
                                   min(12, len(tubes)), length, rng)
        save_checkpoint(args.encoders_out / "motion_encoder", mot_enc.eval(),
                        meta | {"train_loudness_corr": mot_corr})
    obj_enc.eval()
    mot_enc.eval()
    print(f"encoders ready: object acc {obj_acc}, motion corr {mot_corr} "
          f"({time.time() - t0:.0f} s)", flush=True)

    for split, cl in clips.items():
        for c in cl:
            tube, objs = crops[f"{split}/{c.clip_id}"]
            stem = feats / "gt" / c.class_name / c.clip_id
            save_feats(stem, *encode(obj_enc, mot_enc, tube, objs))
            if args.tubes:
                np.save(f"{stem}.tube.npy", tube)
    ensembles = list_ensembles(args.data)
    for e in ensembles:
        rows = load_boxes(e.boxes_path)
        for name in e.classes:
            track = track_from_rows(rows, names.index(name), e.n_frames)
            tube, objs = track_crops(e.frames_dir, track, e.n_frames)
            save_feats(feats / "gt" / "ensembles" / e.clip_id / name,
                       *encode(obj_enc, mot_enc, tube, objs))
    print(f"cached ground-truth features ({time.time() - t0:.0f} s)", flush=True)

    summary: dict = {"object_train_accuracy": obj_acc, "motion_train_corr": mot_corr}
    if args.detector is not None:
        summary |= cache_detector_features(args.detector, obj_enc, mot_enc, clips["test"],
                                           ensembles, feats, names, t0)
    (feats / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
