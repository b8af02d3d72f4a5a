#!/usr/bin/env bash
# Build TensorRT engines for every classifier in models/ (or the folder given), on the Jetson.
# The heatmap proposer and box refiner (cone_proposer*.onnx, cone_refiner*.onnx) run on ONNX
# Runtime on the CPU and are skipped.
#
# For each FP32 model <name>.onnx it builds three engines with `python -m export.engine`:
#   fp32  from <name>.onnx
#   fp16  from <name>.onnx
#   int8  from <name>.int8.onnx, the Q/DQ twin (explicit quantization; made by
#         `python -m calib.quantize`); skipped with a warning when the twin is missing.
# Engines are cached by a key over the ONNX, TensorRT version, GPU and batch profile
# (models/<name>.<precision>.<key>.engine + .json sidecar): unchanged models are not rebuilt,
# and an engine built on another TensorRT or GPU is never reused.
#
# Usage: launch/build_engines.sh [MODELS_DIR] [-- extra export.engine flags, e.g. --config F]
# Env:   PYTHON (default: .venv/bin/python if present, else python3)
#        PRECISIONS (default: "fp32 fp16 int8")
# Exit:  0 all built, 1 a build failed, 3 TensorRT is not installed (not a Jetson/JetPack).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
MODELS_DIR="models"
if [[ $# -gt 0 && "$1" != "--" ]]; then
    MODELS_DIR="$1"
    shift
fi
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
read -r -a WANTED <<<"${PRECISIONS:-fp32 fp16 int8}"

shopt -s nullglob
MODELS=()
for onnx in "$MODELS_DIR"/*.onnx; do
    [[ "$onnx" == *.int8.onnx ]] && continue  # a Q/DQ twin, built with its FP32 model
    case "$(basename "$onnx")" in
        cone_proposer*.onnx|cone_refiner*.onnx)
            # The heatmap proposer and the box refiner run on ONNX Runtime on the CPU,
            # beside the capture loop; only the classifier is built for TensorRT.
            echo "build_engines: skipping $onnx (runs on ONNX Runtime, CPU)" >&2
            continue ;;
    esac
    MODELS+=("$onnx")
done
if [[ ${#MODELS[@]} -eq 0 ]]; then
    echo "build_engines: no FP32 .onnx model in $MODELS_DIR" >&2
    exit 1
fi

failed=0
for onnx in "${MODELS[@]}"; do
    for precision in "${WANTED[@]}"; do
        source_onnx="$onnx"
        if [[ "$precision" == int8 ]]; then
            source_onnx="${onnx%.onnx}.int8.onnx"
            if [[ ! -f "$source_onnx" ]]; then
                echo "build_engines: warning: $source_onnx not found; no int8 engine for $onnx (make it with python -m calib.quantize)" >&2
                continue
            fi
        fi
        echo "== $source_onnx -> $precision"
        status=0
        "$PYTHON" -m export.engine "$source_onnx" --precision "$precision" ${EXTRA[@]+"${EXTRA[@]}"} || status=$?
        case "$status" in
            0) ;;
            3) exit 3 ;;  # export.engine already said TensorRT is missing, in one line
            *) echo "build_engines: $precision engine for $source_onnx failed (exit $status)" >&2
               failed=1 ;;
        esac
    done
done
echo "engines in $MODELS_DIR:"
ls -1 "$MODELS_DIR"/*.engine 2>/dev/null || true
exit "$failed"
