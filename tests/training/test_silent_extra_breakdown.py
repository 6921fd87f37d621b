"""scripts/silent_extra_breakdown.py groups each source by its own clip's generation record."""

import json
from pathlib import Path

import pytest


def write_meta(data: Path, cls: str, clip_id: str, extra: dict | None) -> None:
    path = data / "meta" / cls / f"{clip_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": clip_id, "silent_extra": extra}))


def test_sources_are_grouped_by_their_own_clip(tmp_path, capsys, load_script):
    mod = load_script("silent_extra_breakdown")
    write_meta(tmp_path, "flute", "flute_test_0000", {"class": "drum"})
    write_meta(tmp_path, "drum", "drum_test_0001", None)
    write_meta(tmp_path, "horn", "horn_test_0002", None)
    per_source = [["flute_test_0000+drum_test_0001", "flute", 4.0, 0, 0],
                  ["flute_test_0000+drum_test_0001", "drum", 10.0, 0, 0],
                  ["horn_test_0002+flute_test_0000", "horn", 12.0, 0, 0],
                  ["horn_test_0002+flute_test_0000", "flute", 6.0, 0, 0]]
    assert mod.breakdown(tmp_path, per_source) == {
        "with silent extra": {"sdr": 5.0, "n": 2}, "without": {"sdr": 11.0, "n": 2}}
    row = tmp_path / "row.pairs2.6s.json"
    row.write_text(json.dumps({"sdr": 8.0, "per_source": per_source}))
    assert mod.main(["--data", str(tmp_path), str(row)]) == 0
    assert "| row.pairs2.6s | 5.00 (2) | 11.00 (2) |" in capsys.readouterr().out


def test_a_row_without_per_source_scores_is_refused(tmp_path, load_script):
    row = tmp_path / "old.json"
    row.write_text(json.dumps({"sdr": 8.0}))
    with pytest.raises(SystemExit, match="no per-source scores"):
        load_script("silent_extra_breakdown").main(["--data", str(tmp_path), str(row)])
