#!/usr/bin/env bash
# The main job: install, train the diffusion model, the noisy classifier and the evaluation
# classifier, run the guidance sweep and leave a report folder.
#   bash scripts/main.sh [digits|fashion_mnist|digits_text|fashion_mnist_text] [RUNS_DIR] [REPORT_DIR]
# The captioned datasets (*_text) train the text-conditional model, the noised CLIP, the clean
# evaluation CLIP and the evaluation classifier (of the base dataset), then sweep CFG over text and
# CLIP guidance. Re-running resumes: train.py continues from the latest checkpoint (or does nothing
# when done).
set -euo pipefail
cd "$(dirname "$0")/.."
dataset="${1:-digits}"
case "$dataset" in
  digits|fashion_mnist|digits_text|fashion_mnist_text) ;;
  *) echo "scripts/main.sh: unknown dataset '$dataset'; allowed: digits, fashion_mnist, digits_text," \
       "fashion_mnist_text" >&2; exit 2 ;;
esac
runs="${2:-runs/$dataset}"
out="${3:-reports/$dataset}"
start=$(date +%s)
stamp() { echo "[main $(( $(date +%s) - start ))s] $*"; }

case "$dataset" in fashion_mnist*) bash scripts/install_system_deps.sh ;; esac
python3 -m pip install -q -e .
# glibc's huge-page malloc for XLA's per-step buffers: CPU training steps 5-10 % faster (jaxdiff/util/cpu.py).
# glibc reads it only at process start, so it is set here rather than by the Python entry points.
case "${GLIBC_TUNABLES:-}" in
  *glibc.malloc.hugetlb*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac

# train STAGE CONFIG WORKDIR: one model (train.py resumes from WORKDIR, or does nothing when done)
train() { stamp "training the $1"; python3 train.py --config "$2" --workdir "$3"; }

if [ "${dataset%_text}" != "$dataset" ]; then
  base="${dataset%_text}"
  train "text-conditional diffusion model" "configs/$dataset.py" "$runs/model"
  train "noised CLIP" "configs/${base}_clip.py" "$runs/clip"
  train "evaluation CLIP" "configs/${base}_clip.py:eval" "$runs/eval_clip"
  sweep_args=(--config.clip_image="$runs/clip" --config.clip_text="$runs/clip" --config.eval_clip="$runs/eval_clip")
else
  base="$dataset"
  train "diffusion model" "configs/$dataset.py" "$runs/model"
  train "noisy classifier" "configs/${dataset}_classifier.py" "$runs/classifier"
  sweep_args=(--config.classifier="$runs/classifier")
fi
train "evaluation classifier" "configs/${base}_eval_classifier.py" "$runs/eval_classifier"
stamp "guidance sweep"
python3 sweep.py --config "configs/sweep_$dataset.py" --config.model="$runs/model" "${sweep_args[@]}" \
  --config.eval_classifier="$runs/eval_classifier" --config.out="$out"
stamp "done: report in $out (results.md, plots, settings/*/grid.png)"
