"""training.figures --curves: validation curves from finished and running training folders."""

import json

import pytest

from training import figures


def _history(n: int, offset: float) -> list[dict]:
    return [{"step": 1000 * (i + 1), "elapsed": 200.0 * (i + 1), "loss": 0.1,
             "sdr": offset + i, "sir": 0.0, "sar": 0.0} for i in range(n)]


def test_curves_read_finished_and_running_runs(tmp_path):
    done, running = tmp_path / "done", tmp_path / "running"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"history": _history(3, 1.0)}))
    (running / "last").mkdir(parents=True)
    (running / "last" / "train.json").write_text(json.dumps({"history": _history(2, 5.0)}))
    # A finished run's summary wins over its last state (they agree; the summary is final).
    (done / "last").mkdir()
    (done / "last" / "train.json").write_text(json.dumps({"history": []}))
    assert [h["sdr"] for h in figures.run_history(done)] == [1.0, 2.0, 3.0]
    assert [h["step"] for h in figures.run_history(running)] == [1000, 2000]
    figures.main(["--curves", f"K=2={done}", "--curves", f"B={running}",
                  "--out", str(tmp_path / "figs")])
    png = (tmp_path / "figs" / "val_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_curves_bad_input_is_a_one_line_error(tmp_path, capsys):
    for spec in ("no-equals-sign", f"A={tmp_path / 'missing'}"):
        with pytest.raises(SystemExit) as e:
            figures.main(["--curves", spec, "--out", str(tmp_path)])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "expected LABEL=RUN_FOLDER" in err and "neither summary.json" in err
    assert not (tmp_path / "val_curves.png").exists()
