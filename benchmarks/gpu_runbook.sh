#!/usr/bin/env bash
# Issue 7's benchmarks on the lent GPU machine (one H100, Python 3.12, torch 2.11, no network): the device
# calls, in order. Each call runs one or more STEPS and stays under the tool's 10 minutes per command;
# results land in $OUT (JSON per benchmark, runbook.log, BENCHMARKS.new.md = the rows the scripts appended).
#
# 0. On this machine, from the project root: stage vLLM, Ray, DeepSpeed *and* TRL + datasets (peers):
#        bash ../shared/device/stage.sh vllm ray deepspeed peers
#    then carry each part in its own call, back to back (the machine keeps /tmp only while warm):
#        carry [".device/pK"]   command: mkdir -p /tmp/parts && cp .device/pK/* /tmp/parts/
# 1.     bash /tmp/parts/install.sh && bash benchmarks/gpu_runbook.sh preflight mfu    (~3 min, <= 9 min)
# 2.     bash benchmarks/gpu_runbook.sh e2e_a     ours_gkd + trl_vllm; builds the models       (<= 9.4 min)
# 3.     bash benchmarks/gpu_runbook.sh e2e_b     trl_hf + ours_minillm_a0                     (<= 8 min)
# 4.     bash benchmarks/gpu_runbook.sh e2e_c     ours_minillm_a02; writes the e2e section     (<= 7.5 min)
#    optional, if device time is left:
# 5.     bash benchmarks/gpu_runbook.sh divergence teacher      (the existing benchmarks)       (<= 9 min)
# 6.     bash benchmarks/gpu_runbook.sh rollout                                                 (<= 7 min)
# 7.     bash benchmarks/gpu_runbook.sh e2e_128k     ours_gkd at vocab 128256                    (<= 9.4 min)
# 8.     bash benchmarks/gpu_runbook.sh e2e_128k_trl  trl_vllm at vocab 128256; writes its section (<= 9.4 min)
# Before those, the correctness checks of the GPU paths (one call each; they gate issues 5, 6 and 8):
#  a.    bash /tmp/parts/install.sh && bash benchmarks/gpu_runbook.sh preflight vllm_tests       (<= 9.5 min)
#  b.    bash benchmarks/gpu_runbook.sh debug debug_export   single-GPU mode 20 steps, then its export in
#        vLLM (<= 10 min; if debug_train takes over ~5 min, run debug_export in the next call, machine still warm)
# Priority if time runs short: a, b, 2 (the comparison of the issue), 6, 5, 3, 4, 1, 7, 8. A step can also name its
# systems: `e2e:ours_gkd` or `e2e:trl_vllm` (one system per call if a call risks the 10 minutes). Every e2e
# step passes --reuse, so $OUT/e2e_cuda_0.5b-1.5b_v32000.json holds everything measured so far with this
# configuration in this warm session (parts in /tmp/bench_e2e). If the machine went cold between calls,
# merge the returned JSONs here:  python benchmarks/bench_e2e.py --from-json A.json B.json ...
# (writes the merged JSON and its BENCHMARKS.md section); `e2e_report` writes the section on the device.
#
# Each step runs under `timeout`; a failing step is logged (rc, seconds) and the next one runs.
# RUNBOOK_SMOKE=1 runs the same steps on CPU with tiny models (a check of this script, no vLLM);
# TRL_PY=... picks the python that has TRL (default: the same python).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/bench_out}"
mkdir -p "$OUT"
LOG="$OUT/runbook.log"
PY="${PY:-python3}"
TRL_PY="${TRL_PY:-$PY}"

export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       VLLM_NO_USAGE_STATS=1 TORCH_CUDA_ARCH_LIST=9.0 VLLM_WORKER_MULTIPROC_METHOD=spawn TOKENIZERS_PARALLELISM=false

if [ "${RUNBOOK_SMOKE:-0}" = 1 ]; then
  DEV=cpu; E2E=(--device cpu --shape tiny); MFU=(--device cpu --shape tiny --peak-tflops 1.0)
  SYS_A=ours_gkd; SYS_B=trl_hf,ours_minillm_a0
  DIV=(--device cpu --tokens 256 --vocabs 4096 --repeats 1); ROLL=(--device cpu --size tiny); TEACH=(--device cpu --size tiny)
else
  DEV=cuda; E2E=(--device cuda --shape 0.5b); MFU=(--device cuda --shape 1b --vocab 128256)
  SYS_A=ours_gkd,trl_vllm; SYS_B=trl_hf,ours_minillm_a0
  DIV=(--device cuda --dtype bfloat16 --tokens 8192 --chunk-tokens 4096); ROLL=(--device cuda --size 134m); TEACH=(--device cuda --size 134m)
fi
E2E+=(--trl-python "$TRL_PY" --out-dir "$OUT")

MD=BENCHMARKS.md
MD_START=$(wc -l < "$MD")
STATUS=()

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

run() {  # run NAME TIMEOUT_S COMMAND...: logged, time-limited, never fatal
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  log "== $name (timeout ${limit} s): $*"
  timeout --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  log "== $name: rc=$rc after $((SECONDS - t0)) s"
  STATUS+=("$name rc=$rc $((SECONDS - t0))s")
  return "$rc"
}

finish() {
  tail -n +"$((MD_START + 1))" "$MD" > "$OUT/BENCHMARKS.new.md"
  [ -s "$OUT/BENCHMARKS.new.md" ] || rm -f "$OUT/BENCHMARKS.new.md"
  log "== summary: ${STATUS[*]:-nothing ran}"
  ls -la "$OUT" | tee -a "$LOG"
}
trap finish EXIT

preflight() {
  run preflight 180 bash -c "
    nvidia-smi || true; df -h /tmp /dev/shm; nproc; free -g | head -2  # Ray's object store wants a large /dev/shm
    $PY - <<'EOF'
import importlib
for m in ('torch', 'transformers', 'vllm', 'ray', 'deepspeed', 'tokenizers', 'pynvml'):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, '__version__', 'ok'))
    except Exception as e:
        print(m, 'NOT IMPORTABLE:', type(e).__name__, e)
import torch
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
EOF
    $TRL_PY - <<'EOF'
import importlib
for m in ('trl', 'datasets', 'accelerate', 'pandas', 'xxhash'):
    try:
        print(m, getattr(importlib.import_module(m), '__version__', 'ok'))
    except Exception as e:
        print(m, 'NOT IMPORTABLE:', type(e).__name__, e)
from trl import DistillationConfig, DistillationTrainer
import dataclasses
f = {x.name for x in dataclasses.fields(DistillationConfig)}
print('DistillationConfig has', sorted(f & {'beta', 'lmbda', 'use_vllm', 'vllm_mode', 'max_completion_length', 'generation_kwargs'}))
EOF"
}

# Issue 5 + 6: the single-GPU debug mode (shipped config, one command) on a 135M student / 494M teacher
# built from config, 20 MiniLLM steps with teacher-mixed sampling (alpha 0.2) and a checkpoint at step 10;
# then its exported folder must load in vLLM and generate (benchmarks/check_export_vllm.py).
debug() {
  local models=/tmp/debug_models run=/tmp/debug_run shape_s=135m shape_t=0.5b dev=cuda
  if [ "${RUNBOOK_SMOKE:-0}" = 1 ]; then shape_s=tiny; shape_t=tiny-teacher; dev=cpu; fi
  run debug_student 200 "$PY" -m benchmarks.models --out $models/student --shape $shape_s --vocab 32000 --device $dev || return
  run debug_teacher 200 "$PY" -m benchmarks.models --out $models/teacher --shape $shape_t --vocab 32000 --seed 1 --device $dev || return
  "$PY" - "$models/prompts.jsonl" <<'EOF'
import json, sys
from benchmarks.models import prompt_texts
with open(sys.argv[1], "w") as f:
    for text in prompt_texts(256, 32, 32000):
        f.write(json.dumps({"prompt": text}) + "\n")
EOF
  if [ "$DEV" != cuda ]; then log "debug: models and prompts built; the run itself needs a GPU (vLLM + sleep mode)"; return; fi
  # 64 new tokens: random weights almost never sample EOS, so every row runs to the limit, and mixed sampling
  # alternates engines every ~5 tokens (at 256 tokens a step was estimated at 15-20 s: too long for one call)
  run debug_train 420 "$PY" -m launch.cli train --config single_gpu --no-progress output_dir=$run \
      model.student=$models/student model.teacher=$models/teacher data.prompts=$models/prompts.jsonl \
      data.eval_prompts=null data.chat_template=false trainer.steps=20 checkpoint.every=10 rollout.mix_alpha=0.2 \
      rollout.max_new_tokens=64
  cp $run/metrics.jsonl "$OUT/debug_metrics.jsonl" 2>/dev/null
}

debug_export() {  # the debug run's exported folder in vLLM (its own step: may need a call of its own)
  run debug_export_vllm 240 "$PY" benchmarks/check_export_vllm.py /tmp/debug_run/final --out "$OUT/debug_export_vllm.json"
}

for step in "$@"; do
  case "$step" in
    preflight) preflight ;;
    vllm_tests) # issue 8 (and 4's vLLM client): the gpu-marked tests, vLLM inside Ray actors
               # the file, not tests/: collecting every module would import ones (uvicorn) the GPU machine lacks;
               # no -x: one chance to run, so every test's result
               run vllm_tests 540 "$PY" -m pytest -q -m gpu -rs tests/test_vllm_rollout.py ;;
    debug)     debug ;;
    debug_export) debug_export ;;
    mfu)       # 8 x 2048 tokens a step (~60 GB estimated); on failure (OOM) once more with half the sequences
               run mfu 240 "$PY" benchmarks/bench_learner_mfu.py "${MFU[@]}" --out-dir "$OUT" ||
                 run mfu_4seqs 200 "$PY" benchmarks/bench_learner_mfu.py "${MFU[@]}" --seqs 4 --out-dir "$OUT" ;;
    e2e_a)     run e2e_a 560 "$PY" benchmarks/bench_e2e.py "${E2E[@]}" --systems "$SYS_A" --reuse --system-timeout 255 --markdown '' ;;
    e2e_b)     run e2e_b 470 "$PY" benchmarks/bench_e2e.py "${E2E[@]}" --systems "$SYS_B" --reuse --system-timeout 215 --markdown '' ;;
    e2e_c)     run e2e_c 450 "$PY" benchmarks/bench_e2e.py "${E2E[@]}" --systems ours_minillm_a02 --reuse --system-timeout 420 --markdown "$MD" ;;
    e2e:*)     run "$step" 560 "$PY" benchmarks/bench_e2e.py "${E2E[@]}" --systems "${step#e2e:}" --reuse --system-timeout 520 --markdown '' ;;
    e2e_report) run e2e_report 120 "$PY" benchmarks/bench_e2e.py "${E2E[@]}" --systems none --reuse --markdown "$MD" ;;
    # at 128k the full teacher distribution (2 GB a step for ours) makes one system close to 255 s: one each
    e2e_128k)  run e2e_128k 560 "$PY" benchmarks/bench_e2e.py "${E2E[@]}" --vocab 128256 --systems ours_gkd --reuse --system-timeout 520 --markdown '' ;;
    e2e_128k_trl) run e2e_128k_trl 560 "$PY" benchmarks/bench_e2e.py "${E2E[@]}" --vocab 128256 --systems trl_vllm --reuse --system-timeout 520 --markdown "$MD" ;;
    divergence) run divergence 240 "$PY" benchmarks/bench_divergence_memory.py "${DIV[@]}" --out "$OUT/divergence_memory_$DEV.json" ;;
    teacher)   run teacher 300 "$PY" benchmarks/bench_teacher_scoring.py "${TEACH[@]}" --out-dir "$OUT" ;;
    rollout)   run rollout 400 "$PY" benchmarks/bench_rollout.py "${ROLL[@]}"
               cp benchmarks/results/rollout_"$DEV"_*.json "$OUT/" 2>/dev/null || log "rollout: no JSON to copy" ;;
    *) log "unknown step $step (preflight vllm_tests debug debug_export mfu e2e_a e2e_b e2e_c e2e:SYSTEMS e2e_report e2e_128k e2e_128k_trl divergence teacher rollout)" ;;
  esac
done
