#!/usr/bin/env bash
# One-time (and idempotent) set-up on Debian/Ubuntu: system packages, a virtual environment in
# .venv with the pinned Python packages, and the project installed in editable mode.
# Re-running is cheap: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Debian packages: SoundFont and emoji font for the benchmark generator, PortAudio for audio
# devices, PulseAudio for the virtual microphone of the tests, ffmpeg for streamed-video tests.
DEB_PKGS="python3-venv fluid-soundfont-gm fonts-noto-color-emoji libportaudio2 pulseaudio \
libasound2-plugins ffmpeg"
missing=""
for p in $DEB_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[setup] installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi

# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.iquery-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing Python packages (torch is large: about a minute)"
  log=.venv/pip-install.log
  { .venv/bin/python -m pip install --upgrade pip \
      && .venv/bin/python -m pip install -e . \
      && .venv/bin/python -m pip install --no-deps tinysoundfont; } > "$log" 2>&1 \
    || { tail -n 30 "$log" >&2; echo "[setup] pip failed: see $log" >&2; exit 1; }
  .venv/bin/python -c "import torch, torchaudio, onnxruntime, zmq, av, tinysoundfont" \
    || { echo "[setup] Python packages failed to import" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "[setup] ready: .venv/bin/python"
