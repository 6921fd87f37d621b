"""Shared fixtures of the training tests."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

CLASSES = ["accordion", "banjo", "drum"]
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def load_script():
    """scripts/<name>.py imported as a module (scripts/ is not a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> Path:
    """A fake on-disk dataset: two 2-second tones per class and split, random cached features."""
    root = tmp_path_factory.mktemp("fake")
    rng = np.random.default_rng(0)
    t = np.arange(2 * 11025) / 11025
    for split in ("train", "val"):
        rows = []
        for c, name in enumerate(CLASSES):
            for i in range(2):
                cid = f"{name}_{split}_{i}"
                wav = root / "audio" / name / f"{cid}.wav"
                wav.parent.mkdir(parents=True, exist_ok=True)
                tone = 0.2 * np.sin(2 * np.pi * 200 * (c + 1) * (1 + 0.03 * i) * t)
                wavfile.write(wav, 11025, (tone * 32767).astype(np.int16))
                feat = root / "features" / "gt" / name / cid
                feat.parent.mkdir(parents=True, exist_ok=True)
                np.save(f"{feat}.obj.npy", rng.standard_normal(512).astype(np.float32))
                np.save(f"{feat}.motion.npy", rng.standard_normal((16, 512)).astype(np.float16))
                np.save(f"{feat}.tube.npy", rng.integers(0, 256, (16, 40, 40, 3), np.uint8))
                rows.append(f"audio/{name}/{cid}.wav,frames/{name}/{cid}.mp4,16")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root
