"""scripts/prompt_budget_plot.py: each fine-tuned row becomes one point, as a share of the
reference row scored on the same held-out classes (in whichever results file holds it)."""

import json
from pathlib import Path

import pytest

REF = "full (fp32 seed 2, this machine)"


def row(sdr: float, mode: str | None = None, trainable: int = 0, ckpt: str = "") -> dict:
    out = {"held_out": {"sdr": sdr, "n": 10}, "all": {"sdr": sdr, "n": 20}}
    if mode:
        out |= {"mode": mode, "trainable": trainable, "total": 1000, "checkpoint": ckpt}
    return out


def write(path: Path, held: list[str], rows: dict) -> Path:
    path.write_text(json.dumps({"held_out": held, "n_pairs": 10, "rows": rows}))
    return path


def test_points_are_shares_of_the_reference_on_the_same_classes(tmp_path, capsys, load_script):
    mod = load_script("prompt_budget_plot")
    a = write(tmp_path / "a.json", ["violin", "flute"],
              {"prompt-only": row(6.0, "prompt", 1, "ft_p"), REF: row(12.0),
               "pre-trained": row(2.0)})
    # A later evaluation of new checkpoints without the reference row, plus a rescored one.
    b = write(tmp_path / "b.json", ["violin", "flute"],
              {"decoder": row(9.0, "decoder", 400, "ft_d"), "again": row(6.0, "prompt", 1, "ft_p")})
    c = write(tmp_path / "c.json", ["violin"], {"whole": row(10.0, "full", 1000, "ft_f"),
                                                REF: row(10.0)})
    points = mod.collect([a, b, c], REF)
    got = {(len(p["held_out"]), p["mode"]): (p["fraction"], p["share"]) for p in points}
    assert got == {(2, "prompt"): (0.001, 0.5), (2, "decoder"): (0.4, 0.75),
                   (1, "full"): (1.0, 1.0)}
    out = tmp_path / "fig.png"
    assert mod.main([str(a), str(b), str(c), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert "| violin,flute | decoder | 40 % | 9.00 | 75 % |" in capsys.readouterr().out


def test_a_missing_reference_is_a_clear_error(tmp_path, load_script):
    mod = load_script("prompt_budget_plot")
    a = write(tmp_path / "a.json", ["violin"], {"prompt-only": row(6.0, "prompt", 1, "x")})
    with pytest.raises(SystemExit, match="no row 'full"):
        mod.main([str(a), "--out", str(tmp_path / "f.png")])
