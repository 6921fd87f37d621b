"""Model benchmarks behind the preset sizes (docs/MODELS.md): parameter counts, the time to
separate one 6 s clip, the training step and the streaming step of the `cpu` preset, the visual
encoders, and (--sweep) candidate `cpu` sizes measured side by side. --cuda adds the same model
steps on the GPU (when torch sees one) to the same rounds, so that CPU / GPU are ratios of one run.

Every figure is the median over repeated rounds with its min-max spread. Rounds interleave the
configurations so that load from other processes hits them alike: compare ratios within a run.

    .venv/bin/python scripts/bench_model.py [--threads 2] [--rounds 5] [--sweep] [--onnx] [--cuda]
        [--only "training step"]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.iquery import IQuery
from models.spectral import (
    HOP,
    SAMPLE_RATE,
    StreamingISTFT,
    StreamingSTFT,
    apply_masks,
    model_input,
    stft,
    unwarp,
    warp,
)
from models.visual import MotionEncoder, ObjectEncoder
from training.factory import PRESETS, build_model

CLIP_FRAMES = 256  # one 6 s clip (65535 samples)
N_SOURCES = 2
BATCH = 8
BLOCK = 4  # frames emitted per streaming step
CPU = torch.device("cpu")


def timed(fn: Callable[[], object], inner: int) -> float:
    """Median seconds of `inner` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(inner):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timed call includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def visual_inputs(model: IQuery, b: int, q: int, device: torch.device = CPU) -> dict:
    kw = model.kwargs
    return {k: v.to(device) for k, v in {
        "obj_feats": torch.randn(b, q, kw["obj_dim"]),
        "class_ids": torch.arange(q).repeat(b, 1),
        "motion": torch.randn(b, q, 4, kw["motion_dim"]),
        "motion_pad": torch.zeros(b, q, 4, dtype=torch.bool),
        "query_pad": torch.zeros(b, q, dtype=torch.bool),
    }.items()}


def clip_fn(model: IQuery, device: torch.device = CPU) -> Callable[[], object]:
    """Separate one 256-frame clip: one window, or the clip cut into the model's windows
    (batched) when the window is shorter."""
    model.to(device)
    n_win = max(1, CLIP_FRAMES // model.n_frames)
    x = torch.rand(n_win, 1, model.n_rows, model.n_frames, device=device)
    cache = model.encode_visual(**visual_inputs(model, n_win, N_SOURCES, device))

    def run() -> None:
        with torch.inference_mode():
            model.separate(x, cache)
        sync(device)
    return run


def train_fn(model: IQuery, device: torch.device = CPU, precision: str = "fp32"
             ) -> Callable[[], object]:
    """One Mix-and-Separate step: batch 8, 2 sources, weighted L1 on ratio masks, AdamW;
    precision "bf16" runs the forward pass under bfloat16 autocast (train.py --precision)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(BATCH, 1, model.n_rows, model.n_frames, device=device)
    vis = visual_inputs(model, BATCH, N_SOURCES, device)
    target = torch.rand(BATCH, N_SOURCES, model.n_rows, model.n_frames, device=device)
    weight = x.clone()

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            masks = model(x, **vis)
        loss = ((masks.float() - target).abs() * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
    return run


class StreamStep:
    """The per-block work of the engine for one mixture: STFT of a block of samples, model input
    of the sliding window, separation, masks of the newest frames applied, inverse STFT. On a
    GPU, as in the separator node, only the model runs there: the window goes up, the masks of
    the newest frames come back."""

    def __init__(self, model: IQuery, model_only: bool = False,
                 device: torch.device = CPU) -> None:
        self.model = model.to(device).eval()
        self.model_only, self.device = model_only, device
        self.cache = model.encode_visual(**visual_inputs(model, 1, N_SOURCES, device))
        self.stft, self.istft = StreamingSTFT(), StreamingISTFT()
        rng = np.random.default_rng(0)
        self.audio = rng.standard_normal(SAMPLE_RATE * 60).astype(np.float32) * 0.1
        # Prime a full window: frame t needs 511 samples past t * HOP.
        self.pos = model.n_frames * HOP
        self.window = self.stft.push(self.audio[: self.pos])
        assert self.window.shape[-1] < model.n_frames
        self.window = torch.cat([self.window.new_zeros(512, model.n_frames), self.window], -1)
        self.window = self.window[:, -model.n_frames:]
        self.x = model_input(self.window[None], model.n_rows).to(device)

    def __call__(self) -> None:
        with torch.inference_mode():
            if self.model_only:
                self.model.separate(self.x, self.cache)
                sync(self.device)
                return
            if self.pos + BLOCK * HOP > self.audio.shape[0]:
                self.pos = 0
            new = self.stft.push(self.audio[self.pos:self.pos + BLOCK * HOP])
            self.pos += BLOCK * HOP
            self.window = torch.cat([self.window, new], dim=-1)[:, -self.model.n_frames:]
            x = model_input(self.window[None], self.model.n_rows).to(self.device)
            k = new.shape[-1]
            masks = self.model.separate(x, self.cache)[..., -k:].cpu()  # (1, Q, rows, k)
            out = apply_masks(masks, self.window[None, :, -k:])
            self.istft.push(out[0])


def mixed_by_embedding(model: IQuery) -> IQuery:
    """`model` with its U-Net's per-query sums taken over the full audio embedding, as before
    2026-12-06 (AudioUNet.mix_by_embedding), instead of through the outer layer's weights."""
    model.unet.mix = model.unet.mix_by_embedding  # this instance only
    return model


def onnx_step_fn(model: IQuery) -> Callable[[], object]:
    import onnxruntime as ort

    from models.export import export_onnx

    path = Path(tempfile.mkdtemp()) / "step.onnx"
    export_onnx(model.eval(), path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.rand(1, 1, model.n_rows, model.n_frames).astype(np.float32),
            "queries": np.random.randn(1, N_SOURCES, model.d_model).astype(np.float32),
            "query_pad": np.zeros((1, N_SOURCES), dtype=bool)}
    return lambda: sess.run(None, feed)


def detector_fn(in_size: int) -> Callable[[], object]:
    """The engine's detector call: one 224x224 frame through the exported ONNX graph (which
    resizes it to in_size) on onnxruntime's CPU provider, one thread (nodes/detector.py)."""
    from training.detector import CenterDetector, OnnxDetector, export_detector_onnx

    path = Path(tempfile.mkdtemp()) / f"det{in_size}.onnx"
    export_detector_onnx(CenterDetector(in_size=in_size), path)
    det = OnnxDetector(path)
    frame = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), np.uint8)
    return lambda: det(frame)


def _burn(stop) -> None:
    """Background load standing in for the other engineers' processes: one busy thread."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def run_rounds(jobs: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict:
    """Interleave jobs over rounds; returns name -> list of per-round medians (ms)."""
    results: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (fn, inner) in jobs.items():
            results[name].append(timed(fn, inner) * 1e3)
    return results


def seeded(build: Callable[[], IQuery], seed: int = 0) -> IQuery:
    """build() under a fixed seed, so that two layouts of one model share its weights."""
    torch.manual_seed(seed)
    return build()


def fmt(ms: list[float]) -> str:
    digits = 1 if statistics.median(ms) >= 10 else 3  # the warp rows are well under 1 ms
    return f"{statistics.median(ms):8.{digits}f} ms  [{min(ms):.{digits}f} - {max(ms):.{digits}f}]"


def n_params(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="time candidate cpu sizes")
    parser.add_argument("--onnx", action="store_true", help="also time onnxruntime per step")
    parser.add_argument("--cuda", action="store_true",
                        help="also time the model steps on the GPU (error if torch sees none)")
    parser.add_argument("--only", default="",
                        help="time only the jobs whose name contains this text, e.g. "
                             "'training step'")
    parser.add_argument("--load", type=int, default=0,
                        help="start this many busy background processes (simulated contention)")
    args = parser.parse_args()
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda: torch sees no CUDA device")
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.load)]
    for p in burners:
        p.start()
    try:
        bench(args)
    finally:
        stop.set()
        for p in burners:
            p.join(timeout=5)


def bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, {args.load} busy background processes, "
          f"median [min - max] of per-round medians")

    if args.sweep:
        sweep(args.rounds)
        return

    paper = build_model("paper").eval()
    cpu = build_model("cpu").eval()
    print(f"params: paper {n_params(paper)}, cpu {n_params(cpu)}")
    window_ms = 1e3 * BLOCK * HOP / SAMPLE_RATE
    jobs = {
        "paper: separate one 6 s clip (1 window 256x256, 2 sources)": (clip_fn(paper), 2),
        "cpu: separate one 6 s clip (4 windows 128x64, batched)": (clip_fn(cpu), 5),
        f"cpu: streaming step, model only (window {cpu.n_frames}, 2 sources)":
            (StreamStep(cpu, model_only=True), 20),
        f"cpu: streaming step, STFT->model->iSTFT (block {BLOCK} = {window_ms:.0f} ms audio)":
            (StreamStep(cpu), 20),
        f"cpu: training step (batch {BATCH}, fwd+bwd+AdamW)": (train_fn(build_model("cpu")), 3),
        "paper: training step (batch 8, fwd+bwd+AdamW)": (train_fn(build_model("paper")), 1),
        # The shipped separator's grid, in float32 and under bf16 autocast (train.py --precision)
        "cpu, 256 rows: training step, fp32": (train_fn(build_model("cpu", n_rows=256)), 3),
        "cpu, 256 rows: training step, bf16 autocast":
            (train_fn(build_model("cpu", n_rows=256), precision="bf16"), 3),
        # The shipped grid's streaming step with the masks' channel sums taken over the full
        # audio embedding (before 2026-12-06) and through the outer layer's weights
        # (AudioUNet.mix), the same weights (seed 0 both times), interleaved round by round
        "cpu, 256 rows: streaming step, model only, mix over the embedding (before)":
            (StreamStep(mixed_by_embedding(seeded(lambda: build_model("cpu", n_rows=256))),
                        model_only=True), 20),
        "cpu, 256 rows: streaming step, model only, mix through the weights":
            (StreamStep(seeded(lambda: build_model("cpu", n_rows=256)), model_only=True), 20),
        # A grid as fine as the linear bins: its IRM ceiling is 0.55 dB higher (RESULTS.md 30)
        "cpu, 512 rows: training step, fp32": (train_fn(build_model("cpu", n_rows=512)), 3),
        # The log-frequency warp of a training batch's source spectra (K=3, batch 8, as
        # train.to_tensors reads them from the STFT) and the engine's unwarp of a step's masks,
        # each as warp() does it (two taps gathered) and as a dense matrix (before 2026-11-25)
        **warp_jobs(),
        "ObjectEncoder: 1 crop 224x224": (encoder_fn(ObjectEncoder(), 224), 3),
        "ObjectEncoder: 1 crop 112x112": (encoder_fn(ObjectEncoder(), 112), 5),
        "MotionEncoder: 1 tube 16x112x112": (tube_fn(MotionEncoder()), 3),
        # The shipped detector's input side, and the one it replaced (docs/RESULTS.md 24)
        "Detector (ONNX, CPU): 1 frame 224x224, graph at 96x96": (detector_fn(96), 20),
        "Detector (ONNX, CPU): 1 frame 224x224, graph at 192x192": (detector_fn(192), 20),
    }
    if args.onnx:
        jobs["cpu: streaming step, onnxruntime CPU (model only)"] = (onnx_step_fn(cpu), 20)
    if args.cuda:
        gpu = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name(gpu)} (TF32 convolutions: "
              f"{torch.backends.cudnn.allow_tf32})")
        jobs |= {
            "GPU paper: separate one 6 s clip": (clip_fn(build_model("paper").eval(), gpu), 5),
            "GPU cpu: separate one 6 s clip": (clip_fn(build_model("cpu").eval(), gpu), 5),
            "GPU cpu: streaming step, model only": (StreamStep(build_model("cpu"), True, gpu), 20),
            "GPU cpu: streaming step, STFT->model->iSTFT":
                (StreamStep(build_model("cpu"), device=gpu), 20),
            "GPU cpu: training step (batch 8)": (train_fn(build_model("cpu"), gpu), 5),
            "GPU paper: training step (batch 8)": (train_fn(build_model("paper"), gpu), 5),
        }
    jobs = {name: job for name, job in jobs.items() if args.only in name}
    if not jobs:
        raise SystemExit(f"error: no job name contains {args.only!r}")
    for name, ms in run_rounds(jobs, args.rounds).items():
        print(f"{name:70s} {fmt(ms)}")


def _dense(kind: str, n_out: int, n_in: int) -> torch.Tensor:
    """The (n_out, n_in) interpolation matrix of warp / unwarp, read off the functions."""
    eye = torch.eye(n_in)[None, None]  # column j of the identity is the input bin j
    return (warp(eye, n_out) if kind == "warp" else unwarp(eye, n_out))[0, 0]


def warp_jobs() -> dict[str, tuple[Callable[[], object], int]]:
    spec = stft(torch.randn(BATCH, 3, 63 * HOP))  # (8, 3, 512, 64), transposed FFT layout
    mag = spec.abs()
    to_rows = _dense("warp", 256, mag.shape[-2])
    # One live step's masks as models.streaming.step_masks unwarps them: Q=2 sources, the 2
    # emitted frames (block 2, look-ahead 4) sliced from the 64-frame window's masks
    emitted = torch.rand(2, 256, 64)[:, :, 58:60]
    to_bins = _dense("unwarp", spec.shape[-2], 256)
    return {
        "warp: 24 spectra 512 -> 256 rows, two taps gathered": (lambda: warp(mag, 256), 20),
        "warp: 24 spectra 512 -> 256 rows, dense matrix": (lambda: to_rows @ mag, 20),
        "unwarp: a live step's masks (2 x 256 x 2) -> 512 bins, two taps gathered":
            (lambda: unwarp(emitted), 500),
        "unwarp: a live step's masks (2 x 256 x 2) -> 512 bins, dense matrix":
            (lambda: to_bins @ emitted, 500),
    }


def encoder_fn(enc: ObjectEncoder, size: int) -> Callable[[], object]:
    enc.eval()
    frames = torch.randn(1, 1, 3, size, size)

    def run() -> None:
        with torch.inference_mode():
            enc(frames)
    return run


def tube_fn(enc: MotionEncoder) -> Callable[[], object]:
    enc.eval()
    tube = torch.randn(1, 3, 16, 112, 112)

    def run() -> None:
        with torch.inference_mode():
            enc(tube)
    return run


_D256 = {"d_model": 256, "n_heads": 8, "d_ffn": 1024}
_D128 = {"d_model": 128, "n_heads": 4, "d_ffn": 512}
CANDIDATES = {
    "256x64 ngf32 d256": {"n_rows": 256, "ngf": 32} | _D256,
    "256x64 ngf16 d256": {"n_rows": 256, "ngf": 16} | _D256,
    "256x64 ngf16 d128": {"n_rows": 256, "ngf": 16} | _D128,
    "128x64 ngf32 d128": {"n_rows": 128, "ngf": 32} | _D128,
    "128x64 ngf16 d128": {"n_rows": 128, "ngf": 16} | _D128,
}


def sweep(rounds: int) -> None:
    """Candidate cpu sizes, each as overrides of the cpu preset."""
    jobs = {}
    for name, over in CANDIDATES.items():
        kw = PRESETS["cpu"] | over
        model = IQuery(**kw).eval()
        print(f"{name:26s} params {n_params(model)}")
        jobs[f"{name:26s} streaming step (model only)"] = (StreamStep(model, True), 20)
        jobs[f"{name:26s} training step (batch 8)"] = (train_fn(IQuery(**kw)), 3)
    for name, ms in run_rounds(jobs, rounds).items():
        print(f"{name:60s} {fmt(ms)}")


if __name__ == "__main__":
    main()
