#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian 12 machine. Safe to re-run:
# only missing packages are installed. Needs root (or sudo) when something is missing.
set -euo pipefail

packages=(build-essential cmake catch2 libstb-dev libvulkan-dev glslc mesa-vulkan-drivers
          vulkan-validationlayers libopenblas-dev nlohmann-json3-dev python3 python3-pip)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then sudo_cmd=(); else sudo_cmd=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python packages used by the interoperability tests: the reference GGUF implementation,
# and safetensors + numpy to write and check small Hugging Face style checkpoints.
py_packages=(gguf numpy safetensors sentencepiece tokenizers)
if ! python3 -c "import gguf, numpy, safetensors, sentencepiece, tokenizers" 2>/dev/null; then
    echo "setup: installing Python packages ${py_packages[*]}"
    python3 -m pip install -q "${py_packages[@]}" 2>/dev/null ||
        python3 -m pip install -q --break-system-packages "${py_packages[@]}"
fi
