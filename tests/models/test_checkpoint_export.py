"""Checkpoint round trip without pickle, and ONNX parity of the per-hop path."""

import json
import pickle
import warnings

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.iquery import IQuery, QueryCache
from models.visual import MotionEncoder


@pytest.fixture
def no_pickle(monkeypatch):
    """Make every unpickling path fail while a checkpoint loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_checkpoint_round_trip(tmp_path, small_kwargs, make_batch, no_pickle) -> None:
    torch.manual_seed(0)
    model = IQuery(**small_kwargs)
    model.add_prompts(3)
    # Move batch-norm statistics away from their defaults so they are checked too.
    model.train()
    model(**make_batch(small_kwargs))
    model.eval()
    weights, info = save_checkpoint(tmp_path / "run" / "best", model, {"epoch": 3, "sdr": 5.5})
    assert weights.name == "best.safetensors" and info.name == "best.json"
    header = json.loads(info.read_text())
    assert header["class"] == "IQuery"
    assert header["kwargs"]["prompt_sizes"] == [3]
    assert not list((tmp_path / "run").glob("*.tmp*"))

    loaded, meta = load_checkpoint(tmp_path / "run" / "best.json")
    assert meta == {"epoch": 3, "sdr": 5.5}
    assert isinstance(loaded, IQuery) and not loaded.training
    assert loaded.n_ids == 19
    ref_state, new_state = model.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], new_state[k]), k
    batch = make_batch(small_kwargs)
    batch["class_ids"][0, 0] = 18
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), model(**batch), rtol=0, atol=0)


def test_checkpoint_other_classes_and_errors(tmp_path, no_pickle) -> None:
    enc = MotionEncoder(motion_dim=8, base_channels=4, n_stages=2)
    save_checkpoint(tmp_path / "motion", enc)
    loaded, meta = load_checkpoint(tmp_path / "motion")
    assert isinstance(loaded, MotionEncoder) and meta == {}
    assert loaded.kwargs == enc.kwargs
    with pytest.raises(ValueError, match="cannot checkpoint"):
        save_checkpoint(tmp_path / "x", torch.nn.Linear(2, 2))
    (tmp_path / "bad.json").write_text(json.dumps({"class": "os.system", "kwargs": {}}))
    with pytest.raises(ValueError, match="known"):
        load_checkpoint(tmp_path / "bad")
    with pytest.raises(TypeError):  # metadata must be JSON, nothing is written then
        save_checkpoint(tmp_path / "y", enc, {"obj": object()})
    assert not (tmp_path / "y.safetensors").exists()


def test_onnx_parity(tmp_path, small_kwargs) -> None:
    ort = pytest.importorskip("onnxruntime")
    from models.export import export_onnx

    torch.manual_seed(0)
    model = IQuery(**small_kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(model, tmp_path / "step.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x", "queries", "query_pad"]
    for b, q in [(1, 2), (3, 4), (1, 1)]:
        gen = torch.Generator().manual_seed(b * 10 + q)
        x = torch.rand(b, 1, 32, 32, generator=gen)
        queries = torch.randn(b, q, 32, generator=gen)
        pad = torch.zeros(b, q, dtype=torch.bool)
        if q > 1:
            pad[0, -1] = True
        with torch.no_grad():
            ref = model.separate(x, QueryCache(queries, pad)).numpy()
        out = sess.run(None, {"x": x.numpy(), "queries": queries.numpy(),
                              "query_pad": pad.numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
