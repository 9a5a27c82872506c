#!/usr/bin/env bash
# The main job: install, train the diffusion model, the noisy classifier and the evaluation
# classifier, run the guidance sweep and leave a report folder.
#   bash scripts/main.sh [digits|fashion_mnist|digits_text|fashion_mnist_text|digits_unclip] [RUNS_DIR] [REPORT_DIR]
# The captioned datasets (*_text) train the text-conditional model, the noised CLIP, the clean
# evaluation CLIP and the evaluation classifier (of the base dataset), then sweep CFG over text and
# CLIP guidance. Re-running resumes: train.py continues from the latest checkpoint (or does nothing
# when done). digits_unclip compares unCLIP (DALL-E 2) with GLIDE-style CFG on the captioned digits: it reuses
# (or trains) digits_text's text model, evaluation CLIP and evaluation classifier (runs/digits_text/...), trains
# unCLIP's clean CLIP pair (configs/digits_clip.py:unclip), the prior and the decoder (docs/unclip_training.md),
# then sweeps prior x decoder guidance scales beside the text model's CFG (configs/sweep_digits_unclip.py).
# PIP_SKIP=1 skips the editable install (a checkout whose package is already importable).
set -euo pipefail
cd "$(dirname "$0")/.."
dataset="${1:-digits}"
case "$dataset" in
  digits|fashion_mnist|digits_text|fashion_mnist_text|digits_unclip) ;;
  *) echo "scripts/main.sh: unknown dataset '$dataset'; allowed: digits, fashion_mnist, digits_text," \
       "fashion_mnist_text, digits_unclip" >&2; exit 2 ;;
esac
runs="${2:-runs/$dataset}"
out="${3:-reports/$dataset}"
start=$(date +%s)
stamp() { echo "[main $(( $(date +%s) - start ))s] $*"; }

case "$dataset" in fashion_mnist*) bash scripts/install_system_deps.sh ;; esac
[ "${PIP_SKIP:-0}" = 1 ] || python3 -m pip install -q -e .
# glibc's huge-page malloc for XLA's per-step buffers: CPU training steps 5-10 % faster (jaxdiff/util/cpu.py).
# glibc reads it only at process start, so it is set here rather than by the Python entry points.
case "${GLIBC_TUNABLES:-}" in
  *glibc.malloc.hugetlb*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac

# train STAGE CONFIG WORKDIR [FLAGS...]: one model (train.py resumes from WORKDIR, or does nothing when done)
train() { stamp "training the $1"; python3 train.py --config "$2" --workdir "$3" "${@:4}"; }

if [ "$dataset" = digits_unclip ]; then
  text="runs/digits_text"  # digits_text's models: nothing to train when that job has run
  train "text-conditional diffusion model (digits_text's)" "configs/digits_text.py" "$text/model"
  train "evaluation CLIP (digits_text's)" "configs/digits_clip.py:eval" "$text/eval_clip"
  train "evaluation classifier (digits_text's)" "configs/digits_eval_classifier.py" "$text/eval_classifier"
  clip=(--config.text_encoder.path="$runs/clip" --config.text_encoder.cache_dir="$runs/text_states")
  train "unCLIP's clean CLIP pair" "configs/digits_clip.py:unclip" "$runs/clip"
  train "unCLIP prior" "configs/digits_unclip_prior.py" "$runs/prior" "${clip[@]}"
  train "unCLIP decoder" "configs/digits_unclip_decoder.py" "$runs/decoder" "${clip[@]}"
  stamp "unCLIP vs GLIDE sweep"
  python3 sweep.py --config configs/sweep_digits_unclip.py --config.model="$text/model" \
    --config.eval_clip="$text/eval_clip" --config.eval_classifier="$text/eval_classifier" \
    --config.unclip_prior="$runs/prior" --config.unclip_decoder="$runs/decoder" --config.unclip_clip="$runs/clip" \
    --config.out="$out"
  stamp "done: report in $out (results.md, plots, settings/*/grid.png)"
  exit 0
fi

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
