#!/bin/bash
# The device measurements still owed for issues 15-17 (docs/PERFORMANCE.md, "Owed to the next
# device session"), most important first, inside one 10-minute device call:
#   run(command="T=570 bash tools/device/next_session.sh", carry=[".whl"], timeout_s=600)
# with python-osc's wheel in .whl or .dev/whl (git-excluded; carry it; see the tool library's
# device README: `pip download --no-deps --only-binary=:all: -d .whl python-osc`). Results under $OUT
# (R.txt first). DREAMDECK_MODELS is a fresh folder: the warmup below is the fresh-machine
# start, the live run after it the warm restart.
set -u
export DREAMDECK_MODELS=${DREAMDECK_MODELS:-/tmp/models} PYTHONUNBUFFERED=1
for d in .whl .dev/whl; do  # python-osc for the prompt client (the image has none)
  if ls $d/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl && export PYTHONPATH=/tmp/site
    break
  fi
done
S=$(date +%s); T=${T:-570}
left() { echo $(( T - ($(date +%s) - S) )); }
R=$OUT/R.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$R"; date -u >> "$R"
# 1. issue 17: the fp8 merge kernel variants (ms per whole 14B re-merge)
timeout 55 python tools/device/lora_merge_micro.py > "$OUT/lora_micro.json" 2> "$OUT/lora_micro.err"
echo "== lora micro rc=$? t=$(( $(date +%s) - S ))" >> "$R"
# 2. issues 15/16: fresh-machine warmup; warm restart; 60 fps ring jitter; OSC prompt latency
P=h200-832x480-fp8
if [ "$(left)" -ge 235 ]; then
  timeout 120 python -m engine warmup --preset $P --random-weights --json > "$OUT/warmup.json" 2> "$OUT/warmup.err"
  echo "== warmup rc=$? t=$(( $(date +%s) - S ))" >> "$R"; tail -c 1200 "$OUT/warmup.json" >> "$R"
  timeout 105 python -m engine run --preset $P --random-weights --fps 60 --shm ddjit --duration 100 \
    > "$OUT/live60.log" 2>&1 &
  sleep 28
  timeout 62 python tools/device/osc_prompt_client.py 58 > "$OUT/client.log" 2>&1 &
  timeout 75 python -m engine peek --shm ddjit --stats 60 --json --timeout 40 > "$OUT/jitter60.json" 2>> "$R"
  echo "== peek rc=$? t=$(( $(date +%s) - S ))" >> "$R"; cat "$OUT/jitter60.json" >> "$R"
  wait
  echo "joins: $(grep -c 'joins the block in flight' "$OUT/live60.log"), sent: $(grep -c '^sent' "$OUT/client.log")" >> "$R"
  python tools/device/latencies_from_log.py "$OUT/live60.log" >> "$R"
  grep -i "start-up\|Traceback\|error" "$OUT/live60.log" | head -12 >> "$R"
fi
# 3. issue 17: 14B fp8 base vs one LoRA moving every block (device re-merge), same machine
B="python -m engine bench --model 14b --height 480 --width 832 --steps 1000,750,500,250 --fp8 --compile --blocks 4 --warmup 2 --json"
row() {
  local name=$1 lim=$2; shift 2
  timeout "$lim" $B "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo "== $name rc=$? t=$(( $(date +%s) - S ))" >> "$R"
  python - "$OUT/$name.json" >> "$R" <<'PY'
import json, sys
try:
    d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
    lo = d.get("lora", {})
    print("fps=%s block=%s upd=%s peak=%s held=%s mech=%s kernel=%s" % (
        d.get("fps"), d.get("block_ms"), d.get("stages_ms", {}).get("lora_update"),
        d.get("peak_memory_allocated_gb"), lo.get("held_gb"), lo.get("moving_mechanism"),
        lo.get("merge_kernel")))
except Exception as e:
    print("no json", e)
PY
}
if [ "$(left)" -ge 200 ]; then
  row base 110
  row l1-moving-dev 80 --loras 1 --lora-moving --lora-pristine device
fi
# 4. the GPU tests, with the time left
L=$(left); echo "== gpu tests with ${L}s" >> "$R"
[ "$L" -gt 20 ] && timeout "$L" python -m pytest -q -rs -k "gpu or cuda or kernel or chunked" \
  tests/test_lora_merge.py tests/test_text_encoder.py tests/test_late_prompt.py \
  tests/test_interp_speed.py tests/test_fp8.py tests/test_rife.py > "$OUT/gputests.txt" 2>&1
tail -25 "$OUT/gputests.txt" >> "$R"
date -u >> "$R"
