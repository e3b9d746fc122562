#!/usr/bin/env bash
# Installs the Debian data packages copycat_tf uses when they are missing and apt exists:
#   dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist (problem-domain data)
#   openclipart-png       -> /usr/share/openclipart/png        (natural NPD images)
# Elsewhere it says what to do instead; it never fails the build on its own.
set -u
want=()
[ -d /usr/share/datasets/fashion-mnist ] || want+=(dataset-fashion-mnist)
[ -d /usr/share/openclipart/png ] || want+=(openclipart-png)
[ ${#want[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_data: apt-get not found; install ${want[*]} yourself or pass --data_dir (Fashion-MNIST IDX files)." >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "setup_data: not root and no sudo; install ${want[*]} yourself." >&2
    exit 0
  fi
fi
echo "setup_data: installing ${want[*]} with apt-get" >&2
$sudo apt-get update -qq >/dev/null 2>&1 || true
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null \
  || echo "setup_data: apt-get install ${want[*]} failed; see --data_dir in README.md." >&2
exit 0
