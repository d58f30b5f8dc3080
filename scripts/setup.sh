#!/usr/bin/env bash
# Sets everything up on a fresh machine: Debian build tools and the Fashion-MNIST package (when
# missing and run as root), a virtual environment .venv with the pinned packages
# (requirements.txt), and the extension built in place against that torch (editable install).
#   OQFL_NO_CUDA=1   skip the CUDA kernels;  MAX_JOBS=N   parallel compile jobs;
#   OQFL_NO_FLOWER=1 skip the Flower extras (their tests are then skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
command -v cmake >/dev/null || need_apt+=(cmake)
# Fashion-MNIST idx files for the training test (which is skipped without them)
want_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || want_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ] || [ ${#want_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      "${need_apt[@]}" "${want_apt[@]}"
  elif [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: please install ${need_apt[*]} (apt-get install ${need_apt[*]})" >&2
    exit 1
  else
    echo "setup: optional: apt-get install ${want_apt[*]} (the Fashion-MNIST test is skipped without it)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
# the Flower extras (oqfl_ext.fl.flower; pyproject's [flower] and [simulation]: flwr and, for its
# simulation runtime, Ray), installed here rather than with `-e .[flower,simulation]`, which would
# rebuild the extension
[ "${OQFL_NO_FLOWER:-0}" = 1 ] || .venv/bin/python -m pip install --disable-pip-version-check -q \
  "flwr[simulation]==1.41.0"
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install --disable-pip-version-check -q \
  --no-build-isolation --no-deps -e .
.venv/bin/python -c "import oqfl_ext, oqfl_ext._build_info as b; print('oqfl_ext ready: torch', b.TORCH_VERSION, '| CUDA kernels:', b.WITH_CUDA, b.CUDA_ARCH_LIST)"
