#!/usr/bin/env bash
# One idempotent setup: Debian packages for the default data, .venv with fedaqt + test extras, default corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(flite espeak-ng asterisk-core-sounds-en-wav asterisk-core-sounds-en dataset-fashion-mnist fonts-noto-core)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" = "none" ]; then
    echo "fedaqt setup: missing Debian packages: ${missing[*]}" >&2
    echo "  run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    echo "  (continuing: the default speech corpus and image data need them)" >&2
  else
    echo "==> apt-get install ${missing[*]}"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
echo "==> installing fedaqt (torch 2.14.1, torchaudio 2.11.0, flwr[simulation] 1.42.0, ...)"
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchaudio, flwr; assert torch.__version__.startswith('2.14.1'), torch.__version__; print('torch', torch.__version__, 'torchaudio', torchaudio.__version__, 'flwr', flwr.__version__)"
# qpth (MetaOptNet-SVM's differentiable QP) pins numpy<2 in its metadata, which would downgrade numpy under
# pandas 3; it runs fine on numpy 2, so it is installed without its pins (cvxpy, its other dependency, normally).
.venv/bin/python -m pip install -q cvxpy 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps qpth 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/lint-imports --version >/dev/null  # import-linter (test extra): the layering contracts in pyproject.toml

echo "==> building the default speech corpus in data/speech (phone-menu domain; skipped when complete)"
.venv/bin/fedaqt data speech --out data/speech
echo "==> pretraining the float Conformer on the corpus' pretraining speakers -> runs/pretrained (skipped when it matches)"
.venv/bin/fedaqt pretrain --data-dir data/speech --out runs/pretrained
echo "==> setup complete. Main job: .venv/bin/fedaqt run   Tests: .venv/bin/pytest -q"
