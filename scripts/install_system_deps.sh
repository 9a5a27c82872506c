#!/usr/bin/env bash
# Installs the system packages jaxdiff's data pipeline can use. Run as root (CI images, Docker).
#
#   dataset-fashion-mnist  Debian's Fashion-MNIST idx files in /usr/share/datasets/fashion-mnist,
#                          from which `jaxdiff.data` builds the `fashion_mnist` dataset offline.
#
# Never fails its caller: without apt-get, without root, or when the install fails, it prints a
# note (what to do instead) and exits 0. Set JAXDIFF_SKIP_APT=1 to skip it altogether.
set -u

PKG=dataset-fashion-mnist
DIR=/usr/share/datasets/fashion-mnist

note() { echo "install_system_deps: $*" >&2; }

if [ "${JAXDIFF_SKIP_APT:-0}" = "1" ]; then
  note "JAXDIFF_SKIP_APT=1, skipping"
  exit 0
fi

if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q "install ok installed"; then
  note "$PKG is already installed ($DIR)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  note "apt-get is not available; $PKG not installed. fashion_mnist then needs its idx files" \
       "in a directory passed as manual_dir (or an already prepared tfds data_dir)."
  exit 0
fi

if [ "$(id -u)" != "0" ]; then
  note "not root; $PKG not installed. Run 'sudo apt-get install -y $PKG' (or this script" \
       "with sudo), or pass the idx directory as manual_dir."
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if apt-get install -y --no-install-recommends "$PKG"; then
  :
elif apt-get update && apt-get install -y --no-install-recommends "$PKG"; then
  :
else
  note "apt-get could not install $PKG (offline, or not in this distribution's archive)."
  note "fashion_mnist then needs its idx files in a directory passed as manual_dir."
  exit 0
fi

if [ -d "$DIR" ]; then
  note "installed $PKG: $(ls "$DIR" | tr '\n' ' ')"
else
  note "installed $PKG but $DIR is missing; check 'dpkg -L $PKG'"
fi
exit 0
