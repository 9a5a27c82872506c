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
# glibc's huge-page malloc for XLA's per-step buffers: CPU training steps 5-10 % faster (jaxdiff/cpu.py).
# glibc reads it only at process start, so it is set here rather than by the Python entry points.
case "${GLIBC_TUNABLES:-}" in
  *glibc.malloc.hugetlb*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac

if [ "${dataset%_text}" != "$dataset" ]; then
  base="${dataset%_text}"
  stamp "training the text-conditional diffusion model"
  python3 train.py --config "configs/$dataset.py" --workdir "$runs/model"
  stamp "training the noised CLIP"
  python3 train.py --config "configs/${base}_clip.py" --workdir "$runs/clip"
  stamp "training the evaluation CLIP"
  python3 train.py --config "configs/${base}_eval_clip.py" --workdir "$runs/eval_clip"
  stamp "training the evaluation classifier"
  python3 train.py --config "configs/${base}_eval_classifier.py" --workdir "$runs/eval_classifier"
  stamp "text guidance sweep"
  python3 sweep.py --config "configs/sweep_$dataset.py" --config.model="$runs/model" \
    --config.clip_image="$runs/clip" --config.clip_text="$runs/clip" --config.eval_clip="$runs/eval_clip" \
    --config.eval_classifier="$runs/eval_classifier" --config.out="$out"
  stamp "done: report in $out (results.md, plots, settings/*/grid.png)"
  exit 0
fi

stamp "training the diffusion model"
python3 train.py --config "configs/$dataset.py" --workdir "$runs/model"
stamp "training the noisy classifier"
python3 train.py --config "configs/${dataset}_classifier.py" --workdir "$runs/classifier"
stamp "training the evaluation classifier"
python3 train.py --config "configs/${dataset}_eval_classifier.py" --workdir "$runs/eval_classifier"
stamp "guidance sweep"
python3 sweep.py --config "configs/sweep_$dataset.py" --config.model="$runs/model" \
  --config.classifier="$runs/classifier" --config.eval_classifier="$runs/eval_classifier" \
  --config.out="$out"
stamp "done: report in $out (results.md, plots, settings/*/grid.png)"
