"""ONNX export of the per-hop path (audio network + audio-aware decoder + mask head) with the
query cache as inputs, so that an ONNX runtime can run the engine's per-step work."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from models.iquery import IQuery, QueryCache

INPUT_NAMES = ["x", "queries", "query_pad"]
OUTPUT_NAMES = ["masks"]


class SeparateStep(nn.Module):
    """IQuery.separate() with the cache unpacked into plain tensors."""

    def __init__(self, model: IQuery) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, queries: Tensor, query_pad: Tensor) -> Tensor:
        """x (B, 1, F, T), queries (B, Q, D), query_pad (B, Q) bool -> masks (B, Q, F, T)."""
        return self.model.separate(x, QueryCache(queries=queries, query_pad=query_pad))


def export_onnx(model: IQuery, path: str | os.PathLike, *, opset: int = 18) -> Path:
    """Export model.separate to `path` (eval mode, weights embedded).

    Batch and query count are dynamic axes (1 to 64 each).
    Inputs: x float32 (B, 1, n_rows, n_frames), queries float32 (B, Q, d_model), query_pad
    bool (B, Q). Output: masks float32 (B, Q, n_rows, n_frames).
    """
    if not isinstance(model, IQuery):
        raise TypeError(f"export_onnx exports an IQuery, got {type(model).__name__}")
    if len(model.prompt_offsets):
        # The graph's inputs carry queries only; deep prompts' per-layer offsets would be lost.
        raise ValueError("export_onnx does not export deep prompts (training.prompts --deep); "
                         "run such a checkpoint with the torch backend")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    step = SeparateStep(model).eval()
    device = next(model.parameters()).device
    # torch.export specialises sizes 0 and 1, so the example uses 2 for each dynamic axis.
    example = (
        torch.randn(2, 1, model.n_rows, model.n_frames, device=device),
        torch.randn(2, 2, model.d_model, device=device),
        torch.zeros(2, 2, dtype=torch.bool, device=device),
    )
    b = torch.export.Dim("batch", min=1, max=64)
    q = torch.export.Dim("queries", min=1, max=64)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                step, example, dynamo=True, opset_version=opset,
                input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                dynamic_shapes={"x": {0: b}, "queries": {0: b, 1: q}, "query_pad": {0: b, 1: q}},
                external_data=False, verbose=False)
        program.save(str(path))
    finally:
        model.train(was_training)
    return path
