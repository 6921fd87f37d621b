"""training.package --detector-only: a retrained detector swapped into a shipped folder."""

import json

import pytest

from models.checkpoint import load_checkpoint, save_checkpoint
from models.visual import MotionEncoder, ObjectEncoder
from nodes.bundle import write_fixed_detector
from training.package import main
from training.train import make_model


@pytest.fixture()
def shipped(tmp_path):
    out = tmp_path / "cpu"
    out.mkdir()
    write_fixed_detector(out / "detector.onnx", [0], [[0.1, 0.1, 0.5, 0.5]], [0.9])
    manifest = {"separator": {"file": "separator", "kwargs": {"n_rows": 256}},
                "detector": {"file": "detector.onnx", "metrics": {"in_size": 96}},
                "training_commands": ["old detector", "encoders", "separator"],
                "results": {"pairs": {"iQuery": {"sdr": 13.0}}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    new = tmp_path / "det"
    new.mkdir()
    write_fixed_detector(new / "detector.onnx", [3, 4], [[0, 0, 1, 1], [0, 0, 1, 1]],
                         [0.8, 0.7])
    (new / "detector_metrics.json").write_text(json.dumps(
        {"in_size": 192, "command": "new detector", "ap50_test_solo": {"0": 1.0},
         "map50_ensembles": 0.99}))
    return out, new, manifest


def test_detector_only_swaps_the_onnx_and_its_record_and_keeps_the_rest(shipped):
    out, new, before = shipped
    assert main(["--out", str(out), "--detector", str(new), "--detector-only"]) == 0
    assert (out / "detector.onnx").read_bytes() == (new / "detector.onnx").read_bytes()
    after = json.loads((out / "manifest.json").read_text())
    assert after["detector"]["metrics"] == {"in_size": 192, "command": "new detector",
                                            "map50_ensembles": 0.99}
    assert after["training_commands"] == ["new detector", "encoders", "separator"]
    assert after["separator"] == before["separator"] and after["results"] == before["results"]
    assert sorted(p.name for p in out.iterdir()) == ["detector.onnx", "manifest.json"]


@pytest.mark.parametrize("case, message", [
    ("no manifest", "no manifest.json"),
    ("no metrics", "detector_metrics.json"),
    ("no separator", "--separator and --encoders"),
])
def test_refusals_are_one_line_and_touch_nothing(shipped, case, message, capsys):
    out, new, _ = shipped
    argv = ["--out", str(out), "--detector", str(new), "--detector-only"]
    if case == "no manifest":
        (out / "manifest.json").unlink()
    elif case == "no metrics":
        (new / "detector_metrics.json").unlink()
    else:
        argv = argv[:-1]
    old_onnx = (out / "detector.onnx").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert (out / "detector.onnx").read_bytes() == old_onnx


def test_a_several_rows_prompt_checkpoint_is_refused_before_anything_is_written(
        shipped, tmp_path, capsys):
    _, new, _ = shipped
    model = make_model("iquery", "cpu", ngf=8, d_model=32, n_heads=2, d_ffn=64)
    save_checkpoint(tmp_path / "ft", model, {"mode": "prompt", "rows_per_class": 4})
    out = tmp_path / "pkg"
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--detector", str(new), "--separator", str(tmp_path / "ft"),
              "--encoders", str(tmp_path / "enc")])
    assert e.value.code == 2
    assert "4 prompt rows per class" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


@pytest.fixture()
def shipped_bundle(tmp_path):
    """A whole folder packaged from a tiny separator and encoders, and a retrained separator."""
    det, enc = tmp_path / "det", tmp_path / "enc"
    det.mkdir()
    enc.mkdir()
    write_fixed_detector(det / "detector.onnx", [0], [[0.1, 0.1, 0.5, 0.5]], [0.9])
    (det / "detector_metrics.json").write_text(json.dumps({"command": "detector"}))
    save_checkpoint(enc / "object_encoder", ObjectEncoder(), {"command": "encoders"})
    save_checkpoint(enc / "motion_encoder", MotionEncoder(base_channels=4, n_stages=1), {})
    small = {"ngf": 8, "d_model": 32, "n_heads": 2, "d_ffn": 64}
    save_checkpoint(tmp_path / "old", make_model("iquery", "cpu", **small), {"command": "old"})
    save_checkpoint(tmp_path / "new", make_model("iquery", "cpu", n_rows=256, **small),
                    {"command": "new", "val": {"sdr": 9.5}})
    out = tmp_path / "cpu"
    assert main(["--out", str(out), "--separator", str(tmp_path / "old"), "--detector", str(det),
                 "--encoders", str(enc)]) == 0
    return out, tmp_path


def test_separator_only_swaps_the_weights_and_their_record_and_keeps_the_rest(shipped_bundle):
    out, tmp = shipped_bundle
    keep = {n: (out / n).read_bytes() for n in ("detector.onnx", "object_encoder.safetensors",
                                                "motion_encoder.safetensors")}
    results = tmp / "results.json"
    results.write_text(json.dumps({"pairs": {"new (GT-named)": {"sdr": 14.1}}}))
    assert main(["--out", str(out), "--separator", str(tmp / "new"), "--results", str(results),
                 "--separator-only"]) == 0
    assert keep == {n: (out / n).read_bytes() for n in keep}
    sep, meta = load_checkpoint(out / "separator")
    new, _ = load_checkpoint(tmp / "new")
    assert sep.kwargs == new.kwargs and sep.kwargs["n_rows"] == 256 and meta["command"] == "new"
    for k, v in new.state_dict().items():  # stored as float16
        assert (sep.state_dict()[k].float() - v.float()).abs().max() < 1e-2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["separator"]["kwargs"]["n_rows"] == 256
    assert manifest["training_commands"] == ["detector", "encoders", "new"]
    assert manifest["results"] == {"pairs": {"new (GT-named)": {"sdr": 14.1}}}
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["training"] == {"command": "new", "data": None, "val_sdr": 9.5}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["bundle.json", "manifest.json", "detector.onnx", "separator.json",
         "separator.safetensors", "object_encoder.json", "object_encoder.safetensors",
         "motion_encoder.json", "motion_encoder.safetensors"])


def test_a_recalibrated_separator_keeps_its_recalibration_command_in_the_record(shipped_bundle):
    out, tmp = shipped_bundle
    sep, meta = load_checkpoint(tmp / "new")
    recal = "python -m training.recalibrate --ckpt new --out new_bn2 --n-mix 2"
    save_checkpoint(tmp / "new_bn2", sep, meta | {"bn_recalibrated": {"n_mix": 2,
                                                                       "command": recal}})
    assert main(["--out", str(out), "--separator", str(tmp / "new_bn2"), "--separator-only"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training_commands"] == ["detector", "encoders", "new", recal]
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["training"]["command"] == "new"
    assert bundle["training"]["recalibrate_command"] == recal


def test_separator_only_refuses_a_separator_that_does_not_fit_the_encoders(
        shipped_bundle, capsys):
    out, tmp = shipped_bundle
    save_checkpoint(tmp / "wide", make_model("iquery", "cpu", ngf=8, d_model=32, n_heads=2,
                                             d_ffn=64, obj_dim=256), {})
    before = (out / "separator.safetensors").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--separator", str(tmp / "wide"), "--separator-only"])
    assert e.value.code == 2
    assert "obj_dim 256" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (out / "separator.safetensors").read_bytes() == before
