"""scripts/paired_sdr.py: the SDR difference of two rows, paired over clips, with its error."""

import json
from pathlib import Path

import pytest


def write_row(path: Path, sdrs: dict[str, tuple[float, float]]) -> Path:
    per_source = [[name, cls, sdr, 0.0, 0.0]
                  for name, pair in sdrs.items()
                  for cls, sdr in zip(("x", "y"), pair, strict=True)]
    path.write_text(json.dumps({"sdr": 0.0, "per_source": per_source}))
    return path


def test_sources_are_averaged_per_clip_then_differenced(tmp_path, capsys, load_script):
    mod = load_script("paired_sdr")
    a = write_row(tmp_path / "a.json", {"c1": (10.0, 12.0), "c2": (8.0, 8.0), "c3": (5.0, 7.0)})
    b = write_row(tmp_path / "b.json", {"c3": (6.0, 6.0), "c1": (9.0, 11.0), "c2": (9.0, 9.0)})
    r = mod.paired(mod.per_clip(a), mod.per_clip(b))  # per-clip differences 1, -1, 0
    assert r == pytest.approx({"diff": 0.0, "se": 1 / 3 ** 0.5, "n": 3})
    assert mod.main([str(a), str(b)]) == 0
    assert "a - b: +0.000 dB SDR, standard error 0.577 over 3 clips" in capsys.readouterr().out


def test_rows_of_different_clips_are_refused(tmp_path, load_script):
    mod = load_script("paired_sdr")
    a = write_row(tmp_path / "a.json", {"c1": (1.0, 1.0), "c2": (1.0, 1.0)})
    b = write_row(tmp_path / "b.json", {"c1": (1.0, 1.0), "c9": (1.0, 1.0)})
    with pytest.raises(SystemExit, match="different clips"):
        mod.main([str(a), str(b)])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"sdr": 1.0}))
    with pytest.raises(SystemExit, match="no per-source scores"):
        mod.main([str(old), str(b)])


def test_pair_sources_are_grouped_by_their_own_clip(tmp_path, load_script):
    """A clip recurs in several pairs: its sources are one draw, wherever they were mixed."""
    mod = load_script("paired_sdr")
    a = write_row(tmp_path / "a.json", {"p+q": (10.0, 4.0), "p+r": (12.0, 6.0),
                                        "q+r": (2.0, 8.0)})
    assert mod.per_clip(a) == pytest.approx({"p": 11.0, "q": 3.0, "r": 7.0})


def test_top_lists_the_largest_clips_and_the_mean_without_them(tmp_path, capsys, load_script):
    mod = load_script("paired_sdr")
    a = write_row(tmp_path / "a.json", {"c1": (1.0, 1.0), "c2": (2.0, 2.0), "c3": (20.0, 20.0)})
    b = write_row(tmp_path / "b.json", {"c1": (0.0, 0.0), "c2": (0.0, 0.0), "c3": (0.0, 0.0)})
    assert mod.main([str(a), str(b), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "a - b: +7.667 dB SDR" in out
    assert ("c3: +20.00 dB (+6.667 of the mean over clips; 2 sources, +6.667 of the row's "
            "mean over 6 sources)") in out
    assert "without these 1: +1.500 dB SDR, standard error 0.500 over 2 clips" in out
    with pytest.raises(SystemExit):
        mod.main([str(a), str(b), "--top", "-1"])
