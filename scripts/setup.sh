#!/usr/bin/env bash
# Create ./.venv with everything the pack needs on a fresh machine; --test adds the test dependencies.
# torch is installed first and on its own, and its build is chosen explicitly:
#   - an NVIDIA GPU answers `nvidia-smi -L`: PyPI's default Linux wheel, the CUDA build (~3 GB with its CUDA libraries);
#   - no NVIDIA GPU, Linux: the CPU build (torch==VERSION+cpu), from a wheel already on this machine (pip's configured
#     --find-links, no network) or else from PyTorch's CPU wheel index (short timeout, clear failure);
#   - macOS: PyPI's wheel (it has no CUDA; it is the CPU/MPS build).
# TORCH_SPEC overrides the choice (a requirement such as 'torch==2.13.0' or a wheel file).
# SETUP_DRY_RUN=1 prints the decision and the pip commands and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_INDEX_TIMEOUT=${TORCH_INDEX_TIMEOUT:-30}
DRY_RUN=${SETUP_DRY_RUN:-0}
PIP_INSTALL=(.venv/bin/python -m pip install -q)

note() { echo "setup.sh: $*" >&2; }

run() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ $*"
  else
    "$@"
  fi
}

# Prints why; succeeds when nvidia-smi lists at least one GPU.
nvidia_gpu_present() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no nvidia-smi on PATH"
    return 1
  fi
  local listing count
  if ! listing=$(nvidia-smi -L 2>/dev/null); then
    echo "nvidia-smi -L failed (no NVIDIA driver loaded)"
    return 1
  fi
  count=$(grep -c '^GPU ' <<<"$listing" || true)
  if [ "$count" -eq 0 ]; then
    echo "nvidia-smi lists no GPU"
    return 1
  fi
  echo "nvidia-smi lists $count NVIDIA GPU(s)"
}

install_cpu_torch() {
  local spec="torch==$TORCH_VERSION+cpu"
  local from_index=("${PIP_INSTALL[@]}" --timeout "$TORCH_INDEX_TIMEOUT" --retries 1 --index-url "$TORCH_CPU_INDEX" "$spec")
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ ${PIP_INSTALL[*]} --no-index --no-deps $spec"
    echo "+ ${PIP_INSTALL[*]} $spec"
    echo "+ (only when no $spec wheel is on this machine) ${from_index[*]}"
    return
  fi
  # A wheel on this machine (pip's configured --find-links) first: no network for torch itself; then its
  # dependencies from the configured indexes (torch is already satisfied, so nothing else is chosen for it).
  if "${PIP_INSTALL[@]}" --no-index --no-deps "$spec" 2>/dev/null; then
    note "torch: installed $spec from a wheel on this machine"
    "${PIP_INSTALL[@]}" "$spec"
    return
  fi
  note "torch: no $spec wheel on this machine; downloading it from $TORCH_CPU_INDEX"
  if ! "${from_index[@]}"; then
    note "could not install $spec from $TORCH_CPU_INDEX (unreachable within ${TORCH_INDEX_TIMEOUT}s, or no such build)."
    note "fix: set TORCH_CPU_INDEX to a reachable mirror of it, or TORCH_SPEC to a torch wheel file or requirement."
    exit 1
  fi
}

install_torch() {
  local reason
  if [ -n "${TORCH_SPEC:-}" ]; then
    note "torch: $TORCH_SPEC (TORCH_SPEC set)"
    run "${PIP_INSTALL[@]}" "$TORCH_SPEC"
  elif reason=$(nvidia_gpu_present); then
    note "torch: the CUDA build, torch==$TORCH_VERSION from PyPI ($reason)"
    run "${PIP_INSTALL[@]}" "torch==$TORCH_VERSION"
  elif [ "$(uname -s)" = Darwin ]; then
    note "torch: torch==$TORCH_VERSION from PyPI (macOS: its wheel is the CPU/MPS build)"
    run "${PIP_INSTALL[@]}" "torch==$TORCH_VERSION"
  else
    note "torch: the CPU build, torch==$TORCH_VERSION+cpu ($reason)"
    install_cpu_torch
  fi
}

if [ "$DRY_RUN" = 1 ]; then
  [ -x .venv/bin/python ] || echo "+ $PYTHON -m venv .venv"
else
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
fi
install_torch
run "${PIP_INSTALL[@]}" -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  run "${PIP_INSTALL[@]}" -r requirements-test.txt
fi
