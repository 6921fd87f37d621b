"""scripts/train_all.sh end to end on a tiny SynthMUSIC with seconds of training per step: every
command of the chain still takes the arguments the script gives it, and the bundle it writes at
the end is one the engine loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint
from nodes.bundle import load_bundle
from training import synth

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (synth.DEFAULT_SOUNDFONT.is_file() and synth.DEFAULT_FONT.is_file()),
                    reason="needs Debian fluid-soundfont-gm and fonts-noto-color-emoji")
def test_train_all_runs_the_whole_chain_and_writes_a_bundle_the_engine_loads(tmp_path):
    data, runs, bundle = tmp_path / "synth", tmp_path / "runs", tmp_path / "bundle"
    assert subprocess.run([sys.executable, "-m", "training.synth", "--out", str(data),
                           "--size", "tiny", "--seed", "0", "--quiet"], cwd=ROOT).returncode == 0
    env = os.environ | {"PY": sys.executable, "RUNS": str(runs), "BUNDLE": str(bundle),
                        "THREADS": "1", "DET_STEPS": "2", "OBJ_STEPS": "1",
                        "MOTION_STEPS": "2", "FRAME_STEPS": "2", "AUDIO_LAYERS": "1",
                        # the tiny set's 2 val clips per class hold no 4 distinct partners
                        "VAL_PARTNERS": "1"}
    proc = subprocess.run(["bash", "scripts/train_all.sh", str(data), "0.02", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = next(line for line in proc.stdout.splitlines() if line.startswith("iQuery chosen"))
    assert chosen.endswith((f"{runs}/iquery/best", f"{runs}/iquery_bn2"))
    # the choice heard whole val clips, each beside VAL_PARTNERS partners (4 val clips here)
    val = json.loads((runs / "results_val" / "results.json").read_text())
    assert val["seconds"] == 12 and val["n_pairs"] == 4
    for run in ("iquery", "sop", "iquery_nomotion", "sop_frame"):
        summary = json.loads((runs / run / "summary.json").read_text())
        assert summary["step"] > 0 and summary["n_mix"] == 2, run
    rows = json.loads((runs / "results" / "results.json").read_text())["pairs"]
    assert {"iQuery (GT-named)", "Sound-of-Pixels (GT-named)",
            "iQuery without motion (GT-named)"} <= set(rows)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["results"]["pairs"].keys() == rows.keys()
    loaded = load_bundle(bundle)
    sep = loaded.load_separator("cpu")
    assert type(sep).__name__ == "IQuery" and sep.kwargs["n_rows"] == 256
    # AUDIO_LAYERS reaches both iQuery rows (the shipped separator's depth), not Sound-of-Pixels
    assert sep.kwargs["n_audio_layers"] == 1
    nomotion, _ = load_checkpoint(runs / "iquery_nomotion" / "best")
    assert nomotion.kwargs["n_audio_layers"] == 1
    assert loaded.info["training"]["command"].endswith(f"--out {runs}/iquery --no-progress")
