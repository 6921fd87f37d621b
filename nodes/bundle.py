"""The model bundle on the engine side: load one (docs/BUNDLE.md) and write a random one.

``load_bundle(dir)`` checks bundle.json and the files it names and loads nothing yet: each node
loads only the networks it runs (``Bundle.load_separator`` / ``load_object_encoder`` /
``load_motion_encoder``; the detector is an ONNX file). ``make_random_bundle(dir)`` writes a
bundle of randomly initialised networks and a fixed-box ONNX detector, for tests and for running
the engine before a trained bundle exists.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUNDLE_VERSION = 1
VISUAL_KEYS = ("fps", "obj_crop", "motion_crop", "tube_frames", "obj_frames")
STREAM_KEYS = ("window", "block", "lookahead")
NETWORK_KEYS = ("separator", "object_encoder", "motion_encoder")
# Optional visual settings (fractions) and their defaults: crop margins as the training cache
# used them (models/features.crop_image), and the detector score a track needs.
VISUAL_FLOATS = {"obj_margin": 0.1, "motion_margin": 0.25, "score_threshold": 0.3}

# The project vocabulary in class-id order (shared/instruments.toml); a trained bundle carries
# its own list in bundle.json, this one only names the classes of a random bundle.
VOCABULARY = ("accordion", "acoustic_guitar", "banjo", "drum", "congas", "maracas", "flute",
              "horn", "piano", "saxophone", "trumpet", "violin")

# A small separator for random bundles: fast enough for tests on 2 CPU cores. Same kinds of
# shapes as the presets of training/factory.py, smaller everywhere.
RANDOM_SEPARATOR_KWARGS: dict[str, Any] = {
    "n_rows": 64, "n_frames": 32, "ngf": 8, "unet_depth": 5, "token_stride": 16,
    "d_model": 64, "n_heads": 4, "d_ffn": 128, "n_motion_layers": 1, "n_audio_layers": 3,
    "mask_dim": 16, "n_classes": 12, "n_queries": 16, "obj_dim": 64, "motion_dim": 64,
    "dropout": 0.0}
RANDOM_VISUAL = {"fps": 8, "obj_crop": 64, "motion_crop": 32, "tube_frames": 8, "obj_frames": 2}

# Default detections of the random detector: (class name, box as fractions x1 y1 x2 y2, score).
# Two players left and right, as SynthMUSIC's tiny ensembles, and one detection under any
# sensible threshold.
DEFAULT_DETECTIONS: tuple[tuple[str, tuple[float, float, float, float], float], ...] = (
    ("accordion", (0.05, 0.25, 0.45, 0.75), 0.9),
    ("acoustic_guitar", (0.55, 0.25, 0.95, 0.75), 0.8),
    ("violin", (0.4, 0.0, 0.6, 0.2), 0.1),
)


class BundleError(ValueError):
    """A bundle directory that cannot be used; the message names the file and the problem."""


@dataclass
class Bundle:
    """A checked bundle directory; networks load on demand."""

    path: Path
    classes: list[str]
    visual: dict[str, Any]
    stream: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)

    def file(self, key: str) -> Path:
        """Path of the file named by bundle.json's ``key``."""
        return self.path / self.info[key]

    @property
    def detector_path(self) -> Path:
        """The ONNX detector."""
        return self.file("detector")

    def _load(self, key: str, device: str | None) -> Any:
        from models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(self.file(key), device=device)
        return model

    def load_separator(self, device: str | None = None) -> Any:
        """The IQuery separator in eval mode."""
        return self._load("separator", device)

    def load_object_encoder(self, device: str | None = None) -> Any:
        """models.visual.ObjectEncoder in eval mode."""
        return self._load("object_encoder", device)

    def load_motion_encoder(self, device: str | None = None) -> Any:
        """models.visual.MotionEncoder in eval mode."""
        return self._load("motion_encoder", device)

    def separator_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the separator (read from its JSON, no weights loaded)."""
        return json.loads(self.file("separator").with_suffix(".json").read_text())["kwargs"]


def load_bundle(path: str | Path) -> Bundle:
    """Read ``<path>/bundle.json`` and check that every file it names exists."""
    path = Path(path)
    meta = path / "bundle.json"
    if not meta.is_file():
        raise BundleError(f"{path} is not a model bundle: {meta} is missing")
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta} is not valid JSON: {exc}") from exc
    if info.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{meta}: version {info.get('version')!r}; this engine reads "
                          f"{BUNDLE_VERSION}")
    missing = [k for k in ("classes", *NETWORK_KEYS, "detector", "visual", "stream")
               if k not in info]
    if missing:
        raise BundleError(f"{meta} lacks keys {missing}")
    for key in NETWORK_KEYS:
        for suffix in (".safetensors", ".json"):
            f = path / (info[key] + suffix)
            if not f.is_file():
                raise BundleError(f"{meta} names {key} {info[key]!r} but {f} is missing")
    if not (path / info["detector"]).is_file():
        raise BundleError(f"{meta} names detector {info['detector']!r} but it is missing")
    visual = {k: int(info["visual"][k]) for k in VISUAL_KEYS if k in info["visual"]}
    stream = {k: int(info["stream"][k]) for k in STREAM_KEYS if k in info["stream"]}
    for need, have, name in ((VISUAL_KEYS, visual, "visual"), (STREAM_KEYS, stream, "stream")):
        if set(need) - set(have):
            raise BundleError(f"{meta}: {name} lacks {sorted(set(need) - set(have))}")
    visual |= {k: float(info["visual"].get(k, v)) for k, v in VISUAL_FLOATS.items()}
    return Bundle(path, [str(c) for c in info["classes"]], visual, stream, info)


# ------------------------------------------------------------------------ random bundles
def write_fixed_detector(path: str | Path, class_ids: Sequence[int],
                         boxes_rel: Sequence[Sequence[float]], scores: Sequence[float]) -> Path:
    """Write an ONNX detector with the bundle contract that returns the same K detections for
    every image: boxes given as fractions of the width/height, scaled to the input's pixels.

    images float32 (N, 3, H, W) -> boxes (N, K, 4), scores (N, K), class_ids (N, K) int64.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = len(class_ids)
    if not (k == len(boxes_rel) == len(scores)):
        raise ValueError(f"class_ids, boxes_rel and scores need one entry per detection; got "
                         f"{len(class_ids)}, {len(boxes_rel)}, {len(scores)}")

    def const(name: str, arr: np.ndarray) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))

    nodes = [
        const("rel", np.asarray(boxes_rel, np.float32).reshape(1, k, 4)),
        const("sc", np.asarray(scores, np.float32).reshape(1, k)),
        const("ids", np.asarray(class_ids, np.int64).reshape(1, k)),
        const("i0", np.array([0], np.int64)), const("i1", np.array([1], np.int64)),
        const("i2", np.array([2], np.int64)), const("i3", np.array([3], np.int64)),
        const("i4", np.array([4], np.int64)), const("kk", np.array([k], np.int64)),
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Slice", ["shape", "i0", "i1"], ["n"]),
        helper.make_node("Slice", ["shape", "i2", "i3"], ["h"]),
        helper.make_node("Slice", ["shape", "i3", "i4"], ["w"]),
        helper.make_node("Concat", ["w", "h", "w", "h"], ["whwh_i"], axis=0),
        helper.make_node("Cast", ["whwh_i"], ["whwh"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["rel", "whwh"], ["px"]),  # (1, K, 4) in pixels
        helper.make_node("Concat", ["n", "kk", "i4"], ["shape_b"], axis=0),
        helper.make_node("Concat", ["n", "kk"], ["shape_s"], axis=0),
        helper.make_node("Expand", ["px", "shape_b"], ["boxes"]),
        helper.make_node("Expand", ["sc", "shape_s"], ["scores"]),
        helper.make_node("Expand", ["ids", "shape_s"], ["class_ids"]),
    ]
    graph = helper.make_graph(
        nodes, "fixed_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", k, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info("class_ids", TensorProto.INT64, ["N", k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def make_random_bundle(
    path: str | Path,
    *,
    separator_kwargs: dict[str, Any] | None = None,
    classes: Sequence[str] = VOCABULARY,
    detections: Sequence[tuple[str, Sequence[float], float]] = DEFAULT_DETECTIONS,
    visual: dict[str, int] | None = None,
    block: int = 4,
    lookahead: int = 4,
    motion_channels: int = 8,
    seed: int = 0,
) -> Bundle:
    """Write a bundle of randomly initialised networks (seeded) to ``path`` and load it.

    ``separator_kwargs``: IQuery arguments (default RANDOM_SEPARATOR_KWARGS; pass a preset of
    training/factory.py for realistic sizes). ``detections``: what the fixed detector returns
    for every image, as (class name, (x1, y1, x2, y2) fractions, score).
    """
    import torch

    from models.checkpoint import save_checkpoint
    from models.iquery import IQuery
    from models.visual import MotionEncoder, ObjectEncoder

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = dict(RANDOM_SEPARATOR_KWARGS if separator_kwargs is None else separator_kwargs)
    unknown = [name for name, _, _ in detections if name not in classes]
    if unknown:
        raise ValueError(f"detections name classes {unknown} outside the bundle's {list(classes)}")
    torch.manual_seed(seed)
    separator = IQuery(**kwargs)
    obj = ObjectEncoder(obj_dim=separator.kwargs["obj_dim"])
    motion = MotionEncoder(motion_dim=separator.kwargs["motion_dim"],
                           base_channels=motion_channels, n_stages=2)
    meta = {"random": True, "seed": seed}
    save_checkpoint(path / "separator", separator, meta)
    save_checkpoint(path / "object_encoder", obj, meta)
    save_checkpoint(path / "motion_encoder", motion, meta)
    write_fixed_detector(path / "detector.onnx", [list(classes).index(n) for n, _, _ in detections],
                         [list(b) for _, b, _ in detections], [s for _, _, s in detections])
    info = {
        "version": BUNDLE_VERSION,
        "classes": list(classes),
        "separator": "separator",
        "object_encoder": "object_encoder",
        "motion_encoder": "motion_encoder",
        "detector": "detector.onnx",
        "visual": dict(visual or RANDOM_VISUAL),
        "stream": {"window": separator.n_frames, "block": block, "lookahead": lookahead},
        "training": {"command": "nodes.bundle.make_random_bundle", "data": None,
                     "val_sdr": None, "random": True, "seed": seed},
    }
    (path / "bundle.json").write_text(json.dumps(info, indent=1) + "\n")
    return load_bundle(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m nodes.bundle --random DIR``: write a random bundle; ``--check DIR``: load one."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="Write (--random) or check (--check) a model bundle.")
    ap.add_argument("--random", metavar="DIR", help="write a randomly initialised bundle here")
    ap.add_argument("--check", metavar="DIR", help="check a bundle directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.random:
            b = make_random_bundle(args.random, seed=args.seed)
        elif args.check:
            b = load_bundle(args.check)
        else:
            ap.error("give --random DIR or --check DIR")
    except (BundleError, ValueError, OSError) as exc:
        print(f"nodes.bundle: error: {exc}", file=sys.stderr)
        return 2
    print(f"bundle {b.path}: {len(b.classes)} classes, stream {b.stream}, visual {b.visual}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
