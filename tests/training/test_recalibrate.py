"""training.recalibrate: BatchNorm statistics re-estimated on K-clip training mixtures, every
weight kept, on the fake dataset of conftest.py."""

import copy

import pytest
import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from training import train
from training.instruments import load_vocabulary
from training.mixdata import MixSampler, load_solo
from training.recalibrate import main, recalibrate_batchnorm

NAMES = [inst.name for inst in load_vocabulary()]


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _trained_like(seed: int = 0) -> nn.Module:
    """A small iQuery whose BatchNorm statistics are far from any data's (as after training on
    another K), so a recalibration that does nothing cannot pass."""
    torch.manual_seed(seed)
    model = train.make_model("iquery", "cpu", ngf=8)
    for m in _bns(model):
        m.running_mean.fill_(5.0)
        m.running_var.fill_(9.0)
    return model.eval()


def test_statistics_are_the_average_over_the_batches(fake_data):
    model = _trained_like()
    before = copy.deepcopy(model.state_dict())
    clips = load_solo(fake_data, "train", NAMES)
    n = recalibrate_batchnorm(model, MixSampler(clips, model.n_frames, 2, seed=3), batches=3,
                              batch=2)
    assert n == len(_bns(model)) > 0
    assert not model.training and all(m.momentum == 0.1 for m in _bns(model))

    # The same batches again, the first BatchNorm layer's input seen through a hook.
    ref = _trained_like()
    first = _bns(ref)[0]
    means = []
    first.register_forward_hook(lambda m, i, o: means.append(i[0].mean((0, 2, 3))))
    sampler = MixSampler(clips, ref.n_frames, 2, seed=3)
    with torch.no_grad():
        for _ in range(3):
            train.forward(ref, train.to_tensors(sampler.sample(2), ref.n_rows,
                                                torch.device("cpu")))
    # In eval mode the hook sees the input that training mode normalised by the batch itself.
    torch.testing.assert_close(_bns(model)[0].running_mean, torch.stack(means).mean(0))
    for name, value in model.state_dict().items():
        if "running_" in name or "num_batches" in name:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name


def test_cli_writes_a_new_checkpoint_and_keeps_the_old(fake_data, tmp_path):
    model = _trained_like()
    save_checkpoint(tmp_path / "best", model, {"class_names": NAMES, "model": "iquery"})
    assert main(["--ckpt", str(tmp_path / "best"), "--out", str(tmp_path / "bn2"),
                 "--data", str(fake_data), "--batches", "2", "--threads", "1"]) == 0
    old, _ = load_checkpoint(tmp_path / "best")
    new, meta = load_checkpoint(tmp_path / "bn2")
    assert meta["model"] == "iquery"
    assert meta["bn_recalibrated"]["n_mix"] == 2 and meta["bn_recalibrated"]["batches"] == 2
    assert torch.equal(_bns(old)[0].running_mean, torch.full_like(_bns(old)[0].running_mean, 5))
    assert not torch.equal(_bns(new)[0].running_mean, _bns(old)[0].running_mean)
    torch.testing.assert_close(new.unet.down[0][0].weight, old.unet.down[0][0].weight)


@pytest.mark.parametrize("out, extra, message", [
    ("bn", ["--n-mix", "4"], "--n-mix 4: n_mix=4 needs clips of >= 4 classes"),
    ("bn", ["--batches", "0"], "--n-mix and --batches must be >= 1"),
    ("best", [], "--out must differ from --ckpt"),
])
def test_bad_arguments_fail_in_one_line(fake_data, tmp_path, capsys, out, extra, message):
    save_checkpoint(tmp_path / "best", _trained_like(), {"class_names": NAMES})
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(tmp_path / "best"), "--out", str(tmp_path / out),
              "--data", str(fake_data), *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bn.json").exists()


def test_missing_checkpoint_is_a_usage_error(fake_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x"),
              "--data", str(fake_data)])
    assert "no checkpoint there" in capsys.readouterr().err


def test_missing_dataset_is_a_usage_error(tmp_path, capsys):
    save_checkpoint(tmp_path / "best", _trained_like(), {"class_names": NAMES})
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(tmp_path / "best"), "--out", str(tmp_path / "bn"),
              "--data", str(tmp_path / "no_data")])
    assert e.value.code == 2
    assert "index CSV not found" in capsys.readouterr().err
    assert not (tmp_path / "bn.json").exists()
