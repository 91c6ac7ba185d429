#!/usr/bin/env bash
# Node setup for the Ray cluster launcher (cluster/aws-gpu.yaml, cluster/gcp-gpu.yaml: `setup_commands`).
#
# Contract: on exit 0,
#   - $KCPT_VENV (default ~/kcpt-venv) is a venv on Python >= 3.11 (the pinned transformers needs 3.11; Ubuntu 22.04
#     images ship 3.10, Ubuntu 24.04 images ship 3.12 but refuse system-wide `pip install`, PEP 668);
#   - ~/.bashrc puts $KCPT_VENV/bin first on PATH, as its FIRST line (Ubuntu's .bashrc returns early for
#     non-interactive shells), exactly once however often this runs; Ray sources ~/.bashrc before every setup and
#     `ray start` command, so `ray`, `python`, `kcpt` and every Ray worker come from this venv;
#   - the repo synced to $KCPT_REPO (default ~/kcpt, `file_mounts`) is installed editable with constraints.txt,
#     plus the extras named in $KCPT_EXTRAS (comma-separated, e.g. "mlflow"; default none).
# Re-running it (a second `ray up`) only re-checks the install.
#
# apt is used only on a cloud VM (DMI vendor Amazon EC2 / Google) and only when no Python >= 3.11 with venv support
# is found; elsewhere a missing Python is an error that says what to install. KCPT_APT=0/1 forces the choice.
# KCPT_PYTHON: the interpreter(s) to try (default: python3 python3.12 python3.11 python3.13).
# KCPT_VENV_FLAGS: extra `python -m venv` flags (the tests use --system-site-packages to reuse installed pins).
set -euo pipefail

REPO=${KCPT_REPO:-$HOME/kcpt}
VENV=${KCPT_VENV:-$HOME/kcpt-venv}
EXTRAS=${KCPT_EXTRAS:-}
CANDIDATES=${KCPT_PYTHON:-python3 python3.12 python3.11 python3.13}
DMI_DIR=${KCPT_DMI_DIR:-/sys/class/dmi/id}

log() { echo "setup-node: $*" >&2; }

on_cloud_vm() {
  case ${KCPT_APT:-auto} in
    1) return 0 ;;
    0) return 1 ;;
  esac
  cat "$DMI_DIR/sys_vendor" "$DMI_DIR/product_name" 2>/dev/null | grep -qE 'Amazon EC2|Google'
}

apt_install() {
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@"
}

pick_python() {
  local p
  for p in $CANDIDATES; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

make_venv() {
  local py
  if ! py=$(pick_python); then
    if on_cloud_vm; then
      log "no Python >= 3.11 among: $CANDIDATES; installing python3.11 with apt"
      apt_install python3.11 python3.11-venv
      py=python3.11
    else
      log "ERROR: no Python >= 3.11 among: $CANDIDATES. Install Python 3.11+ with venv support (Ubuntu:"
      log "  apt-get install python3.11 python3.11-venv) or set KCPT_PYTHON to one."
      return 2
    fi
  fi
  # shellcheck disable=SC2086  # KCPT_VENV_FLAGS is a list of flags
  if ! "$py" -m venv ${KCPT_VENV_FLAGS:-} "$VENV"; then
    rm -rf "$VENV"
    if on_cloud_vm; then
      local ver
      ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      log "$py has no venv support; installing python$ver-venv with apt"
      apt_install "python$ver-venv"
      # shellcheck disable=SC2086
      "$py" -m venv ${KCPT_VENV_FLAGS:-} "$VENV"
    else
      log "ERROR: '$py -m venv' failed. Install its venv module (Ubuntu: apt-get install python3-venv)."
      return 2
    fi
  fi
  log "created $VENV with $("$VENV/bin/python" -V 2>&1)"
}

activate_from_bashrc() {
  local line="export PATH=\"$VENV/bin:\$PATH\"  # kcpt venv (cluster/setup-node.sh)"
  if ! grep -qxF "$line" "$HOME/.bashrc" 2>/dev/null; then
    { echo "$line"; cat "$HOME/.bashrc" 2>/dev/null || true; } >"$HOME/.bashrc.kcpt-new"
    mv "$HOME/.bashrc.kcpt-new" "$HOME/.bashrc"
  fi
}

if [ ! -f "$REPO/pyproject.toml" ]; then
  log "ERROR: $REPO/pyproject.toml not found: run \`ray up\` from the repo root (file_mounts syncs it to $REPO)."
  exit 2
fi
[ -x "$VENV/bin/python" ] || make_venv
activate_from_bashrc
"$VENV/bin/python" -m pip install -q -U pip
cd "$REPO"
"$VENV/bin/python" -m pip install -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
"$VENV/bin/python" -c 'import kcpt, ray, torch; print("setup-node: kcpt", kcpt.__file__, "ray", ray.__version__, "torch", torch.__version__)'
if command -v nvidia-smi >/dev/null 2>&1; then  # GPU VM only; a warning, since a GCP driver may still be installing
  "$VENV/bin/python" -c 'import torch; print("setup-node: torch.cuda.is_available() =", torch.cuda.is_available())' || true
fi
