# Sourced by the CUDA scripts: a CUDA toolkit from PyPI's wheels in a venv, for building the
# `cuda` features on a machine without a GPU or a system CUDA (see README, "CUDA").
#   SAR_CUDA_VERSION  13.0 (default: the driver of the GPU machines runs CUDA 13.0, and a
#                     driver cannot load PTX from a newer nvcc)
#   SAR_CUDA_VENV     where the venv lives (default: $HOME/.cache/sar-cuda-$SAR_CUDA_VERSION)
#   SAR_CUDA_RUNTIME  1 = also install cuBLAS/cuRAND/NVRTC and a libcuda stub, to link binaries
SAR_CUDA_VERSION=${SAR_CUDA_VERSION:-13.0}
V=${SAR_CUDA_VENV:-$HOME/.cache/sar-cuda-$SAR_CUDA_VERSION}
pkgs=("nvidia-cuda-nvcc==$SAR_CUDA_VERSION.*" "nvidia-cuda-runtime==$SAR_CUDA_VERSION.*" "nvidia-cuda-crt==$SAR_CUDA_VERSION.*"
      "nvidia-nvvm==$SAR_CUDA_VERSION.*" "nvidia-cuda-cccl==$SAR_CUDA_VERSION.*")
if [ "${SAR_CUDA_RUNTIME:-0}" = 1 ]; then
  pkgs+=("nvidia-cuda-nvrtc==$SAR_CUDA_VERSION.*" "nvidia-cublas==$SAR_CUDA_VERSION.*" "nvidia-curand")
fi
if [ ! -x "$V/bin/pip" ]; then
  python3 -m venv "$V" || return 1
fi
"$V/bin/pip" install -q --no-cache-dir "${pkgs[@]}" || return 1
py=$(ls -d "$V"/lib/python3*/site-packages | head -n 1)
export CU="$py/nvidia/cu${SAR_CUDA_VERSION%%.*}"
# CUDA_COMPUTE_CAP: there is no nvidia-smi to ask; 90 = Hopper (H100/H200).
export PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
if [ "${SAR_CUDA_RUNTIME:-0}" = 1 ]; then
  # Unversioned names for the linker, and a stub libcuda (the driver's library, which only the
  # GPU machine has) exporting every driver symbol the objects reference.
  stub="$V/stub"
  mkdir -p "$stub"
  for lib in "$CU"/lib/lib*.so.*; do
    base=$(basename "$lib"); ln -sf "$lib" "$stub/${base%%.so.*}.so"
  done
  export LIBRARY_PATH="$stub:$CU/lib:${LIBRARY_PATH:-}"
fi
# dfdx's build script asks `nvidia-smi` for the compute capability (and fails without it); on a
# machine without a GPU a stand-in answers 9.0 (Hopper), the same as CUDA_COMPUTE_CAP.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  mkdir -p "$V/fake-smi"
  printf '#!/bin/sh\necho compute_cap\necho 9.0\n' > "$V/fake-smi/nvidia-smi"
  chmod +x "$V/fake-smi/nvidia-smi"
  export PATH="$V/fake-smi:$PATH"
fi
