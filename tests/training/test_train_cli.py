"""The training command line end to end on a fake on-disk dataset (tones + random cached
features): best/last checkpoints, resume after a stop, and 2-process DDP (gloo on CPU)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import training.train as train_mod
from models.checkpoint import load_checkpoint
from training.train import main

ROOT = Path(__file__).resolve().parents[2]


def test_cli_trains_keeps_best_and_resumes(fake_data, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(fake_data), "--model", "iquery", "--batch", "2", "--val-every", "2",
            "--val-mixtures", "2", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args + ["--steps", "2"]) == 0
    model, meta = load_checkpoint(out / "best")
    assert meta["model"] == "iquery" and meta["class_names"][0] == "accordion"
    assert meta["kwargs"]["n_frames"] == model.n_frames
    assert main(args + ["--steps", "3"]) == 0  # resumes at step 2, runs one more
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3
    assert [h["step"] for h in summary["history"]] == [2, 3]


def test_cli_ema_keeps_the_average_as_best_and_resumes_it(fake_data, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(fake_data), "--model", "sop", "--batch", "2", "--val-every", "1",
            "--val-mixtures", "2", "--out", str(out), "--no-progress", "--threads", "1",
            "--ema", "0.9"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3"]) == 0  # resumes the average at 2 updates
    ema_meta = json.loads((out / "last" / "ema.json").read_text())["meta"]
    assert ema_meta["ema_updates"] == 3 and ema_meta["step"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ema"] == 0.9 and summary["step"] == 3
    saved_ema, _ = load_checkpoint(out / "last" / "ema")
    raw, _ = load_checkpoint(out / "last" / "model")
    assert any(not torch.equal(a, b) for a, b in zip(
        saved_ema.parameters(), raw.parameters(), strict=True))
    best, meta = load_checkpoint(out / "best")
    if meta["step"] == 3:  # best (when the last step) is the average, not the raw weights
        for (k, a), b in zip(best.state_dict().items(), saved_ema.state_dict().values(),
                             strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_cli_bf16_run_with_nan_gradients_goes_on_in_fp32_and_says_so(fake_data, tmp_path,
                                                                     capsys, monkeypatch):
    real = train_mod.train_step

    def broken_bf16(*args, precision="fp32", **kw):  # as AMX bf16 kernels on some Xeons
        if precision == "bf16":
            raise train_mod.NonFiniteStep("nan")
        return real(*args, precision=precision, **kw)

    monkeypatch.setattr(train_mod, "train_step", broken_bf16)
    out = tmp_path / "nan"
    assert main(["--data", str(fake_data), "--model", "sop", "--batch", "2", "--steps", "3",
                 "--val-every", "3", "--val-mixtures", "2", "--out", str(out), "--no-progress",
                 "--threads", "1", "--precision", "bf16"]) == 0
    assert "non-finite gradients under bf16 autocast" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["skipped_steps"] == 1
    assert summary["precision"] == "fp32" and summary["precision_fallback_step"] == 0
    assert np.isfinite(summary["best_sdr"])
    assert load_checkpoint(out / "best")[1]["precision"] == "fp32"
    # A resumed run stays in float32: no second bf16 attempt, no second skip.
    assert main(["--data", str(fake_data), "--model", "sop", "--batch", "2", "--steps", "5",
                 "--val-every", "5", "--val-mixtures", "2", "--out", str(out), "--no-progress",
                 "--threads", "1", "--precision", "bf16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 5 and summary["skipped_steps"] == 1
    assert summary["precision"] == "fp32" and summary["precision_fallback_step"] == 0


def test_cli_contrastive_weight_is_logged_and_recorded(fake_data, tmp_path, capsys):
    out = tmp_path / "nce"
    assert main(["--data", str(fake_data), "--model", "iquery", "--batch", "2", "--steps", "2",
                 "--val-every", "2", "--val-mixtures", "2", "--out", str(out), "--no-progress",
                 "--threads", "1", "--contrastive-weight", "0.2"]) == 0
    _, meta = load_checkpoint(out / "best")
    assert meta["contrastive_weight"] == 0.2 and meta["contrastive_temperature"] == 0.1
    assert meta["lr_steps"] == [0.8]
    last = json.loads((out / "summary.json").read_text())["history"][-1]
    assert last["contrastive"] > 0 and last["mask_loss"] > 0
    assert " contrastive " in capsys.readouterr().out
    assert any(p.name.startswith("events.") for p in (out / "tb").iterdir())


def test_cli_motion_e2e_trains_the_motion_encoder_and_resumes(fake_data, tmp_path):
    import torch

    from models.checkpoint import save_checkpoint
    from models.visual import MotionEncoder

    torch.manual_seed(0)
    init = MotionEncoder(motion_dim=512, base_channels=16, n_stages=1)
    save_checkpoint(tmp_path / "init", init)
    out = tmp_path / "e2e"
    args = ["--data", str(fake_data), "--model", "iquery", "--batch", "2", "--val-every", "2",
            "--val-mixtures", "2", "--out", str(out), "--no-progress", "--threads", "1",
            "--motion-e2e", str(tmp_path / "init")]
    assert main(args + ["--steps", "2"]) == 0
    sep, meta = load_checkpoint(out / "best")
    enc, _ = load_checkpoint(out / "best_motion_encoder")
    assert type(sep).__name__ == "IQuery" and meta["motion_e2e"] == str(tmp_path / "init")
    moved = [k for k, v in enc.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, init.state_dict()[k])]
    assert "stem.0.weight" in moved and "proj.weight" in moved  # trained, not frozen
    assert (out / "last" / "model_motion_encoder.safetensors").is_file()
    assert main(args + ["--steps", "3"]) == 0  # resumes both networks at step 2
    assert json.loads((out / "summary.json").read_text())["step"] == 3


def test_cli_motion_e2e_refuses_a_model_without_motion(fake_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--data", str(fake_data), "--model", "iquery_nomotion", "--steps", "1",
              "--out", str(tmp_path / "r"), "--motion-e2e", "random"])
    assert "--motion-e2e needs --model iquery" in capsys.readouterr().err


def test_cli_motion_e2e_refuses_a_checkpoint_that_is_not_a_motion_encoder(fake_data, tmp_path,
                                                                          capsys):
    from models.checkpoint import save_checkpoint
    from models.visual import ObjectEncoder

    save_checkpoint(tmp_path / "obj", ObjectEncoder(obj_dim=512))
    code = main(["--data", str(fake_data), "--model", "iquery", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "r"), "--motion-e2e", str(tmp_path / "obj")])
    assert code == 2 and "got a ObjectEncoder" in capsys.readouterr().err


def test_cli_n_rows_ngf_and_precision_override_the_preset(fake_data, tmp_path):
    out = tmp_path / "rows"
    assert main(["--data", str(fake_data), "--model", "sop", "--batch", "2", "--steps", "1",
                 "--val-every", "1", "--val-mixtures", "2", "--out", str(out), "--no-progress",
                 "--threads", "1", "--n-rows", "64", "--ngf", "8", "--precision", "bf16",
                 "--n-frames", "128"]) == 0
    model, meta = load_checkpoint(out / "best")
    assert model.n_rows == 64 and meta["kwargs"]["n_rows"] == 64
    assert model.n_frames == meta["kwargs"]["n_frames"] == 128  # the preset's is 64
    assert model.kwargs["ngf"] == meta["kwargs"]["ngf"] == 8
    assert meta["precision"] == "bf16"
    assert all(w.dtype == torch.float32 for w in model.state_dict().values()
               if w.is_floating_point())  # the checkpoint is float32 whatever the precision


def test_cli_dropout_overrides_the_preset_and_is_saved(fake_data, tmp_path):
    out = tmp_path / "drop"
    assert main(["--data", str(fake_data), "--model", "iquery", "--batch", "2", "--steps", "1",
                 "--val-every", "1", "--val-mixtures", "2", "--out", str(out), "--no-progress",
                 "--threads", "1", "--dropout", "0"]) == 0
    model, meta = load_checkpoint(out / "best")
    assert model.kwargs["dropout"] == meta["kwargs"]["dropout"] == 0.0  # the preset's is 0.1
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize("model, key", [("iquery", "mask_dim"), ("sop", "n_channels")])
def test_cli_mask_dim_sizes_the_audio_embedding_of_either_model(fake_data, tmp_path, model, key):
    out = tmp_path / model
    assert main(["--data", str(fake_data), "--model", model, "--batch", "2", "--steps", "1",
                 "--val-every", "1", "--val-mixtures", "2", "--out", str(out), "--no-progress",
                 "--threads", "1", "--mask-dim", "8"]) == 0
    loaded, meta = load_checkpoint(out / "best")
    assert loaded.kwargs[key] == meta["kwargs"][key] == 8  # the preset's is 32
    # the widest layer, the U-Net's outer transposed convolution, now writes 8 channels
    assert loaded.unet.up[0].out_channels == 8


def test_cli_token_stride_sets_the_grid_of_audio_tokens(fake_data, tmp_path):
    out = tmp_path / "ts8"
    assert main(["--data", str(fake_data), "--model", "iquery", "--batch", "2", "--steps", "1",
                 "--val-every", "1", "--val-mixtures", "2", "--out", str(out), "--no-progress",
                 "--threads", "1", "--token-stride", "8"]) == 0
    model, meta = load_checkpoint(out / "best")
    assert model.kwargs["token_stride"] == meta["kwargs"]["token_stride"] == 8  # preset: 16
    # the cpu preset's 128x64 window at stride 8: 16x8 tokens (8x4 at 16)
    assert model.audio_pos.shape == (1, 16 * 8, model.d_model)
    tokens, _ = model.eval().encode_audio(torch.zeros(1, 1, model.n_rows, model.n_frames))
    assert tokens.shape == (1, 16 * 8, model.d_model)


@pytest.mark.parametrize("flag, value, says", [("--token-stride", "8", "--token-stride takes"),
                                               ("--audio-layers", "1", "--audio-layers takes")])
def test_cli_transformer_sizes_refuse_sound_of_pixels(fake_data, tmp_path, capsys, flag, value,
                                                      says):
    with pytest.raises(SystemExit):
        main(["--data", str(fake_data), "--model", "sop", "--steps", "1",
              "--out", str(tmp_path / "r"), flag, value])
    assert says in capsys.readouterr().err


def test_cli_audio_layers_sets_the_decoder_depth(fake_data, tmp_path):
    out = tmp_path / "l1"
    assert main(["--data", str(fake_data), "--model", "iquery", "--batch", "2", "--steps", "1",
                 "--val-every", "1", "--val-mixtures", "2", "--out", str(out), "--no-progress",
                 "--threads", "1", "--audio-layers", "1"]) == 0
    model, meta = load_checkpoint(out / "best")
    assert model.kwargs["n_audio_layers"] == meta["kwargs"]["n_audio_layers"] == 1  # preset: 3
    assert len(model.audio_self) == len(model.audio_cross) == len(model.audio_ffn) == 1


def test_cli_dropout_refuses_sound_of_pixels(fake_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--data", str(fake_data), "--model", "sop", "--steps", "1",
              "--out", str(tmp_path / "r"), "--dropout", "0"])
    assert "--dropout takes a value in [0, 1) for an iquery model" in capsys.readouterr().err


def test_cli_rejects_missing_features(fake_data, tmp_path, capsys):
    code = main(["--data", str(fake_data), "--steps", "1", "--out", str(tmp_path / "r"),
                 "--features", str(tmp_path / "nowhere"), "--no-progress"])
    assert code == 2 and "training.encoders" in capsys.readouterr().err


def test_device_auto_takes_a_gpu_per_local_process_or_the_cpu(monkeypatch):
    import torch

    from training.train import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pick_device("auto") == torch.device("cuda:0")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun, 2 processes, 1 GPU: all on the CPU
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="1 CUDA device.*2 local process"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pick_device("auto") == torch.device("cpu")


def test_ddp_two_cpu_processes(fake_data, tmp_path):
    out = tmp_path / "ddp"
    # ROOT first, the caller's path kept (packages installed outside the venv stay importable).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.train", "--data", str(fake_data),
           "--model", "sop", "--steps", "2", "--batch", "2", "--val-every", "2",
           "--val-mixtures", "2", "--out", str(out), "--no-progress", "--device", "cpu"]
    # Own process group: a hang is killed whole (torchrun's workers included), no orphans.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"2-process DDP training hung: {err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 2


def test_evaluate_pairs_of_training_clips(fake_data, tmp_path, capsys):
    """--pairs-from train: fixed pairs of different classes from train.csv, GT-named rows
    only (training clips have no detector features), beside a baseline."""
    from training.evaluate import main as evaluate
    from training.evaluate import split_pairs

    pairs = split_pairs(fake_data, "train", per_class=2)
    assert len(pairs) == 6 and all(a.class_name != b.class_name for a, b in pairs)
    assert [(a.clip_id, b.clip_id) for a, b in pairs] == \
        [(a.clip_id, b.clip_id) for a, b in split_pairs(fake_data, "train", per_class=2)]
    assert all("_train_" in a.clip_id and "_train_" in b.clip_id for a, b in pairs)
    first = split_pairs(fake_data, "train", per_class=1)
    more = split_pairs(fake_data, "train", per_class=1, partners=2)
    assert more[:3] == first and len(more) == 6  # a second partner per clip, first round kept
    assert all(a.class_name != b.class_name for a, b in more)
    assert len({frozenset((a.clip_id, b.clip_id)) for a, b in more}) == 6  # no mixture twice
    with pytest.raises(ValueError, match="--partners 99"):
        split_pairs(fake_data, "train", partners=99)
    run = tmp_path / "run"
    assert main(["--data", str(fake_data), "--model", "sop", "--batch", "2", "--steps", "1",
                 "--val-every", "1", "--val-mixtures", "2", "--out", str(run),
                 "--no-progress", "--threads", "1"]) == 0
    out = tmp_path / "eval"
    args = ["--data", str(fake_data), "--out", str(out), "--pairs-from", "train",
            "--baselines", "irm", "--seconds", "1", "--ckpt", f"m={run / 'best'}"]
    with pytest.raises(SystemExit, match="--max-ensembles 0"):
        evaluate(args)
    with pytest.raises(SystemExit, match="the test pairs are fixed"):
        evaluate(args[:4] + ["--partners", "2", "--max-ensembles", "0"])
    assert evaluate(args + ["--max-ensembles", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_pairs"] == 6 and res["n_ensembles"] == 0
    assert set(res["pairs"]) == {"Ideal ratio mask (oracle)", "m (GT-named)"}
    assert res["pairs"]["Ideal ratio mask (oracle)"]["sdr"] > res["pairs"]["m (GT-named)"]["sdr"]


def test_cli_curriculum_switches_k_at_the_first_lr_drop(fake_data, tmp_path):
    out = tmp_path / "run"
    assert main(["--data", str(fake_data), "--model", "iquery", "--batch", "2", "--steps", "4",
                 "--val-every", "1", "--val-mixtures", "2", "--n-mix", "3",
                 "--n-mix-final", "2", "--lr-steps", "0.5", "--out", str(out),
                 "--no-progress", "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [h["n_mix"] for h in summary["history"]] == [3, 3, 2, 2]
    assert summary["n_mix"] == 3 and summary["n_mix_final"] == 2
