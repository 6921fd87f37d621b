"""scripts/detector_crops.py: test clips ordered by how unlike its ground-truth crop's feature
the detector-named crop's feature is."""

import numpy as np
import pytest


def test_clips_are_listed_lowest_cosine_first(tmp_path, capsys, load_script):
    mod = load_script("detector_crops")
    rows = []
    feats = {"violin_test_0000": [1.0, 0.0], "violin_test_0001": [0.6, 0.8]}
    for clip_id, det in feats.items():
        rows.append(f"audio/violin/{clip_id}.wav,frames/violin/{clip_id}.mp4,10")
        for kind, vec in (("det", det), ("gt", [1.0, 0.0])):
            stem = tmp_path / "features" / kind / "violin" / clip_id
            stem.parent.mkdir(parents=True, exist_ok=True)
            np.save(f"{stem}.obj.npy", np.array(vec, np.float32))
        np.save(tmp_path / "features" / "det" / "violin" / f"{clip_id}.cls.npy",
                np.array(11, np.int64))
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    assert mod.main(["--data", str(tmp_path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 test clips: feature cosine median 0.800, min 0.600" in out
    first, second = [line for line in out.splitlines() if line.startswith("| violin_test")]
    assert first == "| violin_test_0001 | violin | 0.600 | - |"
    assert second == "| violin_test_0000 | violin | 1.000 | - |"


def test_a_missing_cache_is_a_one_line_error(tmp_path, load_script):
    mod = load_script("detector_crops")
    (tmp_path / "test.csv").write_text("audio/violin/v.wav,frames/violin/v.mp4,10\n")
    with pytest.raises(SystemExit, match="no cached feature"):
        mod.main(["--data", str(tmp_path)])
    with pytest.raises(SystemExit, match="index CSV not found"):
        mod.main(["--data", str(tmp_path / "nowhere")])
