"""Checkpoints without pickle: <stem>.safetensors holds the weights, <stem>.json the model class,
its constructor arguments and free-form metadata, so a checkpoint rebuilds its model by itself.

This is the one file I/O in models/, on purpose: training/ and nodes/ share one loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from models.iquery import IQuery
from models.sop import SoundOfPixels
from models.visual import MotionEncoder, ObjectEncoder

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (IQuery, SoundOfPixels, ObjectEncoder, MotionEncoder)
}


def checkpoint_stem(path: str | os.PathLike) -> Path:
    """A checkpoint's stem from the stem itself or either of its two files."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path_stem: str | os.PathLike, model: nn.Module,
                    meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write <stem>.safetensors then <stem>.json, each atomically (tmp file + os.replace).

    The model must be one of MODEL_CLASSES and expose its constructor arguments as
    `model.kwargs`; meta must be JSON-serialisable. Returns (weights path, json path).
    """
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise ValueError(f"cannot checkpoint a {name}; known classes: {sorted(MODEL_CLASSES)}")
    stem = checkpoint_stem(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, info = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    # Fail on unserialisable metadata before touching any file.
    text = json.dumps({"class": name, "kwargs": model.kwargs, "meta": meta or {}}, indent=2)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(weights, lambda p: save_file(state, str(p)))
    _atomic_write(info, lambda p: p.write_text(text + "\n"))
    return weights, info


def load_checkpoint(path: str | os.PathLike,
                    device: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from <stem>.json and load <stem>.safetensors (strict); path may be the
    stem or either file. Returns (model in eval mode, meta)."""
    stem = checkpoint_stem(path)
    info = json.loads(stem.with_suffix(".json").read_text())
    name = info.get("class")
    if name not in MODEL_CLASSES:
        raise ValueError(f"{stem}.json names class {name!r}; known: {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[name](**info["kwargs"])
    model.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))), strict=True)
    if device is not None:
        model.to(device)
    return model.eval(), info.get("meta", {})
