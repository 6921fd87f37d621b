"""Assemble the shipped checkpoint folder (models/checkpoints/cpu/) from training runs: detector
ONNX, object and motion encoders, the separator (safetensors + JSON each, loadable with
models.checkpoint.load_checkpoint), and manifest.json with class names, constructor arguments,
preprocessing and the commands that trained each part.

    python -m training.package --out models/checkpoints/cpu --separator runs/iquery/best \
        --detector runs/detector --encoders runs/encoders
    python -m training.package --out models/checkpoints/cpu --detector runs/detector \
        --detector-only      (a retrained detector into the shipped folder, nothing else)
    python -m training.package --out models/checkpoints/cpu --separator runs/iquery/best \
        --results runs/results/results.json --separator-only
                             (a retrained separator into the shipped folder, nothing else)

Weights are stored as float16 to keep the folder small (load_state_dict casts them back).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.checkpoint import load_checkpoint
from training.encoders import (
    MEAN,
    MOTION_CROP,
    MOTION_MARGIN,
    OBJ_CROP,
    OBJ_FRAMES,
    OBJ_MARGIN,
    STD,
    class_names,
)
from training.separate import FPS, motion_len

# The engine's default schedule for files (STFT frames), chosen on the 60 val pairs with
# scripts/bench_file_vs_offline.py --sweep-on val --schedules 16:24,16:48,8:56,2:4 (blended, the
# last steps in the clip's last window; docs/RESULTS.md section 36): 8:56 15.49 dB, 16:48 15.45,
# 16:24 15.38, offline 15.39. Each frame is estimated by the 8 windows that hold it, at every
# place in them, and blended: 2x the steps of 16:24, for files, where latency is no concern.
FILE_BLOCK, FILE_LOOKAHEAD = 8, 56
SCORE_THRESHOLD = 0.3  # training.visual_data.detector_rows' default: detector-named features


def save_half(stem: Path, model: torch.nn.Module, meta: dict) -> None:
    """save_checkpoint's format with float16 floating tensors."""
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(
        {"class": type(model).__name__, "kwargs": model.kwargs, "meta": meta}, indent=2) + "\n")


def detector_entry(det_metrics: dict) -> dict:
    """The manifest's record of the detector: file, contract, train_detector's metrics."""
    return {"file": "detector.onnx", "contract": "images float32 (N,3,H,W) RGB 0..1 -> boxes "
            "(N,K,4) x1y1x2y2 px, scores (N,K), class_ids (N,K) int64",
            "metrics": {k: v for k, v in det_metrics.items() if not k.startswith("ap50_")}}


def separator_entries(sep: torch.nn.Module, sep_meta: dict) -> dict:
    """The manifest's records of the separator: its entry and the window it separates with."""
    return {"separator": {"file": "separator", "class": type(sep).__name__, "kwargs": sep.kwargs,
                          "trained": {k: v for k, v in sep_meta.items() if k != "kwargs"}},
            "separation": {"window_frames": sep.n_frames, "hop_frames": sep.n_frames // 2,
                           "overlap_add": "triangular weights on the warped masks"}}


def recalibrate_command(sep_meta: dict) -> str | None:
    """The training.recalibrate command that re-estimated the separator's BatchNorm statistics
    after training, if one did: without it the weights cannot be reproduced from the record."""
    return (sep_meta.get("bn_recalibrated") or {}).get("command")


def separator_commands(sep_meta: dict) -> list:
    """The commands that made the separator, in order: its training, then its recalibration."""
    recal = recalibrate_command(sep_meta)
    return [sep_meta.get("command")] + ([recal] if recal else [])


def bundle_training(sep_meta: dict) -> dict:
    """bundle.json's record of how the separator was trained."""
    out = {"command": sep_meta.get("command"), "data": sep_meta.get("data"),
           "val_sdr": (sep_meta.get("val") or {}).get("sdr")}
    recal = recalibrate_command(sep_meta)
    if recal:
        out["recalibrate_command"] = recal
    return out


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def swap_detector(ap: argparse.ArgumentParser, out: Path, detector: Path,
                  det_metrics: dict) -> int:
    """--detector-only: a retrained detector into a shipped folder, nothing else touched (the
    separator and encoders do not depend on the detector; only detector-named evaluation
    rows do, and those are re-measured separately)."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        ap.error(f"--detector-only: {out} has no manifest.json to update (package it whole "
                 "first)")
    manifest = json.loads(manifest_path.read_text())
    tmp = out / "detector.onnx.tmp"
    shutil.copyfile(detector / "detector.onnx", tmp)
    os.replace(tmp, out / "detector.onnx")
    manifest["detector"] = detector_entry(det_metrics)
    commands = manifest.get("training_commands") or [None]
    manifest["training_commands"] = [det_metrics.get("command"), *commands[1:]]
    write_json_atomic(manifest_path, manifest)
    print(f"swapped the detector of {out} for {detector / 'detector.onnx'}")
    return 0


def swap_separator(ap: argparse.ArgumentParser, out: Path, separator: Path,
                   results: Path | None) -> int:
    """--separator-only: a retrained separator into a shipped folder; the detector and encoders
    stay (a separator trained on their feature cache is what fits them). The manifest's
    results are replaced by --results (the new separator's rows) when given."""
    manifest_path, bundle_path = out / "manifest.json", out / "bundle.json"
    if not (manifest_path.is_file() and bundle_path.is_file()):
        ap.error(f"--separator-only: {out} has no manifest.json and bundle.json to update "
                 "(package it whole first)")
    if results is not None and not results.is_file():
        ap.error(f"--results {results}: no such file")
    sep, sep_meta = load_checkpoint(separator)
    manifest, bundle = json.loads(manifest_path.read_text()), json.loads(bundle_path.read_text())
    for key in ("obj_dim", "motion_dim"):  # the encoders' outputs must fit the new separator
        shipped = manifest["separator"]["kwargs"].get(key)
        if shipped is not None and sep.kwargs.get(key) != shipped:
            ap.error(f"--separator {separator}: {key} {sep.kwargs.get(key)} does not fit the "
                     f"shipped encoders' {shipped}")
    stem = out / "separator"
    tmp = out / "separator_new"
    save_half(tmp, sep, sep_meta)
    for suffix in (".safetensors", ".json"):
        os.replace(tmp.with_suffix(suffix), stem.with_suffix(suffix))
    manifest.update(separator_entries(sep, sep_meta))
    commands = manifest.get("training_commands") or [None, None, None]
    manifest["training_commands"] = [*commands[:2], *separator_commands(sep_meta)]
    if results is not None:
        manifest["results"] = json.loads(results.read_text())
    bundle["visual"]["tube_frames"] = motion_len(sep.n_frames)  # both follow the window
    bundle["stream"]["window"] = sep.n_frames
    bundle["training"] = bundle_training(sep_meta)
    write_json_atomic(manifest_path, manifest)
    write_json_atomic(bundle_path, bundle)
    print(f"swapped the separator of {out} for {separator}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write")
    ap.add_argument("--separator", type=Path, default=None, help="checkpoint stem")
    ap.add_argument("--detector", type=Path, default=None,
                    help="train_detector --out folder (not with --separator-only)")
    ap.add_argument("--encoders", type=Path, default=None, help="encoders --encoders-out")
    ap.add_argument("--results", type=Path, default=None, help="evaluate's results.json")
    ap.add_argument("--detector-only", action="store_true",
                    help="swap only the detector of the existing folder --out (its ONNX file, "
                         "the manifest's detector entry and command); the separator, encoders "
                         "and results stay as they are")
    ap.add_argument("--separator-only", action="store_true",
                    help="swap only the separator of the existing folder --out (its weights, "
                         "the manifest's separator entry, command and --results, the bundle's "
                         "window); the detector and encoders stay as they are")
    args = ap.parse_args(argv)
    if args.separator_only:
        if args.separator is None or args.detector is not None or args.detector_only:
            ap.error("--separator-only takes --separator (and --results), no detector")
        return swap_separator(ap, args.out, args.separator, args.results)
    if args.detector is None:
        ap.error("--detector is needed (or --separator-only)")
    metrics_path = args.detector / "detector_metrics.json"
    if not ((args.detector / "detector.onnx").is_file() and metrics_path.is_file()):
        ap.error(f"--detector {args.detector}: needs detector.onnx and detector_metrics.json "
                 "(python -m training.train_detector --out ...)")
    det_metrics = json.loads(metrics_path.read_text())
    if args.detector_only:
        return swap_detector(ap, args.out, args.detector, det_metrics)
    if args.separator is None or args.encoders is None:
        ap.error("--separator and --encoders are needed (or --detector-only)")
    sep, sep_meta = load_checkpoint(args.separator)
    if sep_meta.get("rows_per_class", 1) > 1:  # training.prompts finetune --rows
        ap.error(f"--separator {args.separator}: joins {sep_meta['rows_per_class']} prompt "
                 "rows per class, which the engine does not; package a one-row checkpoint")
    args.out.mkdir(parents=True, exist_ok=True)
    obj, obj_meta = load_checkpoint(args.encoders / "object_encoder")
    mot, mot_meta = load_checkpoint(args.encoders / "motion_encoder")
    save_half(args.out / "separator", sep, sep_meta)
    save_half(args.out / "object_encoder", obj, obj_meta)
    save_half(args.out / "motion_encoder", mot, mot_meta)
    shutil.copyfile(args.detector / "detector.onnx", args.out / "detector.onnx")
    entries = separator_entries(sep, sep_meta)
    manifest = {
        "class_names": class_names(),
        # The model's own kwargs only: checkpoints before 2026-11-23 recorded the preset's in
        # their meta (n_rows 128 for an --n-rows 256 run).
        "separator": entries["separator"],
        "object_encoder": {"file": "object_encoder", "kwargs": obj.kwargs, "crop": OBJ_CROP,
                           "frames_max_pooled": OBJ_FRAMES, "crop_margin": OBJ_MARGIN},
        "motion_encoder": {"file": "motion_encoder", "kwargs": mot.kwargs, "crop": MOTION_CROP,
                           "crop_margin": MOTION_MARGIN,
                           "box": "median box of the track over the clip (a still crop)",
                           "tokens": "one per video frame", "fps": FPS},
        "preprocessing": {"crop_rgb": "uint8 RGB / 255, then (x - mean) / std",
                          "mean": MEAN, "std": STD},
        "detector": detector_entry(det_metrics),
        "separation": entries["separation"],
        "training_commands": [det_metrics.get("command"), obj_meta.get("command"),
                              *separator_commands(sep_meta)],
    }
    if args.results is not None and args.results.is_file():
        manifest["results"] = json.loads(args.results.read_text())
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # What the engine reads (docs/BUNDLE.md); manifest.json keeps the full record.
    bundle = {
        "version": 1, "classes": class_names(), "separator": "separator",
        "object_encoder": "object_encoder", "motion_encoder": "motion_encoder",
        "detector": "detector.onnx",
        "visual": {"fps": int(FPS), "obj_crop": OBJ_CROP, "motion_crop": MOTION_CROP,
                   "tube_frames": motion_len(sep.n_frames), "obj_frames": OBJ_FRAMES,
                   "obj_margin": OBJ_MARGIN, "motion_margin": MOTION_MARGIN,
                   "score_threshold": SCORE_THRESHOLD},
        "stream": {"window": sep.n_frames, "block": FILE_BLOCK, "lookahead": FILE_LOOKAHEAD},
        "training": bundle_training(sep_meta),
    }
    (args.out / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
