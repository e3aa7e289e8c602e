#!/usr/bin/env bash
# The Safety Mirage paper on real weights, end to end: convert the HF LLaVA -> generate harmful candidates on
# VLGuard's train unsafe queries -> a judge picks the most harmful -> build VLGuard with forget/retain -> train
# post-hoc SFT, mixed SFT, NPO, RMU (configs/vlguard/) -> evaluate each with the judge -> export to HF.
# Every stage is a `mirage` command that resumes where it stopped; rerunning the script redoes nothing that
# finished. --dry-run prints the commands instead.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/paper.sh --hf=HF_LLAVA --vlguard=VLGUARD_DIR --out=DIR [options]

Stages, in order (--stages=a,b,... runs some of them; default: all):
  convert   HF LLaVA (and --judge_hf, --posthoc_hf, --mixed_hf) -> mirage run dirs under OUT/models/
  generate  --num_candidates sampled answers of the base to every unsafe train query -> OUT/forget/candidates.jsonl
  select    the judge picks the most harmful candidate -> OUT/forget/harmful_responses.json
  build     VLGuard with forget (harmful responses) and retain (padded to --retain_size) -> OUT/data/
  train     post-hoc SFT, mixed SFT, NPO, RMU from the base (configs/vlguard/*.py:SIZE) -> OUT/runs/<method>
  eval      every model (base included) with the judge -> OUT/runs/<method>/eval.json
  export    every trained model -> HF LLaVA safetensors under OUT/hf/<method>

Options (--name=value):
  --hf=DIR                 the un-aligned base, an HF LlavaForConditionalGeneration dir (required)
  --vlguard=DIR            VLGuard's train.json, test.json, train/ and test/ images, and the Safety Mirage attack
                           files test_what_3shot.json / test_share_1shot.json (required)
  --out=DIR                where everything is written (a path every host sees, for a pod) (required)
  --size=SIZE              paper config size: 7b (default) or 13b (tiny for a CPU rehearsal)
  --judge_hf=DIR           an HF LLaVA judge for select and for eval.judge=model (converted to OUT/models/judge)
  --harmful_responses=JSON skip generate + select: the image -> harmful response JSON to use
  --judge=NAME             eval.judge: keyword | model | file (default: model with --judge_hf, else keyword)
  --judge_file=JSONL       verdicts for --judge=file (eval.judge_file)
  --retain_size=N          retain padded to N rows (default 2000, the official mix_retain_data.py)
  --retain_extra=JSON      the LLaVA-format data retain is padded from (llava_v1_5_mix665k.json or a subset)
  --retain_extra_images=DIR  its image folder
  --num_candidates=N       harmful candidates sampled per query (default 4) --temperature=T (1.0) --top_p=P (0.9)
                           --seed=S. The official candidates are instead the greedy answers of four LLaVA-1.5
                           variants: run `mirage generate --temperature=0 --num_candidates=1` per model and
                           give every file to `mirage select`
  --methods=LIST           which to train (default posthoc_sft,mixed_sft,npo,rmu)
  --posthoc_hf=DIR --mixed_hf=DIR  VLGuard's released SFT checkpoints (ys-zong/llava-v1.5-7b-Posthoc / -Mixed):
                           converted and evaluated instead of training that method
  --mirage=CMD             how mirage runs (default: mirage); e.g. "launch/tpu_vm.sh run --name=X --zone=Y --"
                           for the heavy stages on every worker of a TPU slice
  --local_mirage=CMD       how mirage runs for convert/select/build/export on this host (default: mirage)
  --train_args=ARGS --posthoc_sft_args=ARGS --mixed_sft_args=ARGS --npo_args=ARGS --rmu_args=ARGS
  --generate_args=ARGS --select_args=ARGS --eval_args=ARGS --build_args=ARGS
                           extra flags (space separated) for those commands, e.g. --train_args=--config.total_steps=10
  --dry-run                print the commands
USAGE
}

HF="" VLGUARD="" OUT="" SIZE=7b JUDGE_HF="" HARMFUL="" JUDGE="" JUDGE_FILE="" RETAIN_SIZE=2000 RETAIN_EXTRA=""
RETAIN_EXTRA_IMAGES="" NUM_CANDIDATES=4 TEMPERATURE=1.0 TOP_P=0.9 SEED=0 METHODS=posthoc_sft,mixed_sft,npo,rmu
POSTHOC_HF="" MIXED_HF="" MIRAGE=mirage LOCAL_MIRAGE="" STAGES=convert,generate,select,build,train,eval,export
declare -A EXTRA=()
for arg in "$@"; do
  case $arg in
    --hf=*) HF=${arg#*=} ;;
    --vlguard=*) VLGUARD=${arg#*=} ;;
    --out=*) OUT=${arg#*=} ;;
    --size=*) SIZE=${arg#*=} ;;
    --judge_hf=*) JUDGE_HF=${arg#*=} ;;
    --harmful_responses=*) HARMFUL=${arg#*=} ;;
    --judge=*) JUDGE=${arg#*=} ;;
    --judge_file=*) JUDGE_FILE=${arg#*=} ;;
    --retain_size=*) RETAIN_SIZE=${arg#*=} ;;
    --retain_extra=*) RETAIN_EXTRA=${arg#*=} ;;
    --retain_extra_images=*) RETAIN_EXTRA_IMAGES=${arg#*=} ;;
    --num_candidates=*) NUM_CANDIDATES=${arg#*=} ;;
    --temperature=*) TEMPERATURE=${arg#*=} ;;
    --top_p=*) TOP_P=${arg#*=} ;;
    --seed=*) SEED=${arg#*=} ;;
    --methods=*) METHODS=${arg#*=} ;;
    --posthoc_hf=*) POSTHOC_HF=${arg#*=} ;;
    --mixed_hf=*) MIXED_HF=${arg#*=} ;;
    --mirage=*) MIRAGE=${arg#*=} ;;
    --local_mirage=*) LOCAL_MIRAGE=${arg#*=} ;;
    --stages=*) STAGES=${arg#*=} ;;
    --train_args=*|--posthoc_sft_args=*|--mixed_sft_args=*|--npo_args=*|--rmu_args=*|--generate_args=*|\
    --select_args=*|--eval_args=*|--build_args=*)
      key=${arg%%=*}; EXTRA[${key#--}]=${arg#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $arg" ;;
  esac
done
[[ -n $HF && -n $VLGUARD && -n $OUT ]] || die "--hf, --vlguard and --out are required"
[[ -n $HARMFUL || -n $JUDGE_HF || ,$STAGES, != *,select,* ]] ||
  die "the select stage needs a judge: give --judge_hf=HF_LLAVA, or --harmful_responses=JSON to skip it"
[[ -n $RETAIN_EXTRA || $RETAIN_SIZE == 0 ]] ||
  die "--retain_size=$RETAIN_SIZE needs --retain_extra=LLAVA_JSON to pad from (or --retain_size=0)"
JUDGE=${JUDGE:-$([[ -n $JUDGE_HF ]] && echo model || echo keyword)}
case $JUDGE in
  keyword) JUDGE_FLAGS=(--config.eval.judge=keyword) ;;
  model) [[ -n $JUDGE_HF ]] || die "--judge=model needs --judge_hf"
         JUDGE_FLAGS=(--config.eval.judge=model "--config.eval.judge_checkpoint=$OUT/models/judge") ;;
  file) [[ -n $JUDGE_FILE ]] || die "--judge=file needs --judge_file=JSONL"
        JUDGE_FLAGS=(--config.eval.judge=file "--config.eval.judge_file=$JUDGE_FILE") ;;
  *) die "--judge=$JUDGE: expected keyword, model or file" ;;
esac
LOCAL_MIRAGE=${LOCAL_MIRAGE:-mirage}
read -r -a M <<<"$MIRAGE"
read -r -a L <<<"$LOCAL_MIRAGE"
extra() {  # the extra flags given for $1, one per line (none: no line)
  local -a out=()
  read -r -a out <<<"${EXTRA[$1]:-}"
  if ((${#out[@]})); then printf '%s\n' "${out[@]}"; fi
}
mapfile -t TRAIN_ARGS < <(extra train_args)
HARMFUL=${HARMFUL:-$OUT/forget/harmful_responses.json}
stage() { [[ ,$STAGES, == *,$1,* ]]; }

# The built dataset's directory (content-addressed by its inputs): read from the build stage's JSON summary.
data_path() {
  if ((DRY_RUN)) && [[ ! -f $OUT/data/build.json ]]; then
    echo '$DATA_PATH'
  else
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["path"])' "$OUT/data/build.json"
  fi
}

convert() {  # HF dir -> OUT/models/NAME, once
  if [[ -f $OUT/models/$2/config.json ]] && ! ((DRY_RUN)); then
    echo "paper.sh: $OUT/models/$2 exists, not converting again" >&2
  else
    run "${L[@]}" convert hf-to-jax "--hf=$1" "--out=$OUT/models/$2"
  fi
}

if stage convert; then
  convert "$HF" base
  [[ -z $JUDGE_HF ]] || convert "$JUDGE_HF" judge
  [[ -z $POSTHOC_HF ]] || convert "$POSTHOC_HF" posthoc_sft
  [[ -z $MIXED_HF ]] || convert "$MIXED_HF" mixed_sft
fi

if stage generate && [[ $HARMFUL == "$OUT/forget/harmful_responses.json" ]]; then
  ((DRY_RUN)) || mkdir -p "$OUT/forget"
  mapfile -t args < <(extra generate_args)
  run "${M[@]}" generate "--workdir=$OUT/models/base" "--input=$VLGUARD/train.json" \
    "--out=$OUT/forget/candidates.jsonl" "--num_candidates=$NUM_CANDIDATES" "--temperature=$TEMPERATURE" \
    "--top_p=$TOP_P" "--seed=$SEED" "${args[@]}"
fi

if stage select && [[ $HARMFUL == "$OUT/forget/harmful_responses.json" ]]; then
  mapfile -t args < <(extra select_args)
  run "${L[@]}" select "--candidates=$OUT/forget/candidates.jsonl" "--judge_checkpoint=$OUT/models/judge" \
    "--out=$HARMFUL" "${args[@]}"
fi

if stage build; then
  ((DRY_RUN)) || mkdir -p "$OUT/data"
  mapfile -t args < <(extra build_args)
  retain=()
  ((RETAIN_SIZE == 0)) || retain=("--retain_size=$RETAIN_SIZE" "--retain_extra=$RETAIN_EXTRA")
  [[ -z $RETAIN_EXTRA_IMAGES ]] || retain+=("--retain_extra_images=$RETAIN_EXTRA_IMAGES")
  cmd=("${L[@]}" data build --name=vlguard "--manual_dir=$VLGUARD" "--model=$OUT/models/base"
       "--data_dir=$OUT/data" "--harmful_responses=$HARMFUL" "${retain[@]}" "${args[@]}")
  if ((DRY_RUN)); then
    echo "$(quote_cmd "${cmd[@]}") > $OUT/data/build.json"
  else
    "${cmd[@]}" >"$OUT/data/build.json"
  fi
fi

IFS=, read -r -a METHOD_LIST <<<"$METHODS"
released() { [[ ($1 == posthoc_sft && -n $POSTHOC_HF) || ($1 == mixed_sft && -n $MIXED_HF) ]]; }

if stage train; then
  DATA=$(data_path)
  for method in "${METHOD_LIST[@]}"; do
    [[ -f $REPO/configs/vlguard/$method.py ]] || die "--methods: no configs/vlguard/$method.py"
    released "$method" && continue
    mapfile -t args < <(extra "${method}_args")
    run "${M[@]}" train "--config=configs/vlguard/$method.py:$SIZE" "--workdir=$OUT/runs/$method" \
      "--config.init_from=$OUT/models/base" "--config.data.path=$DATA" "${TRAIN_ARGS[@]}" "${args[@]}"
  done
fi

run_dir() { if released "$1" || [[ $1 == base ]]; then echo "$OUT/models/$1"; else echo "$OUT/runs/$1"; fi; }

if stage eval; then
  DATA=$(data_path)
  mapfile -t args < <(extra eval_args)
  for model in base "${METHOD_LIST[@]}"; do
    dir=$(run_dir "$model")
    run "${M[@]}" eval "--workdir=$dir" "--out=$OUT/eval/$model" "--config.data.path=$DATA" \
      "${JUDGE_FLAGS[@]}" "${args[@]}"
  done
fi

if stage export; then
  for method in "${METHOD_LIST[@]}"; do
    released "$method" && continue
    run "${L[@]}" convert jax-to-hf "--ckpt=$OUT/runs/$method" "--out=$OUT/hf/$method"
  done
fi
