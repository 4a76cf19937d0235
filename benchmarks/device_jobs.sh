# Run GPU jobs on the device machine in per-GPU chains under one deadline; tar what they write.
#
#   source benchmarks/device_jobs.sh            # BUDGET=560 (seconds) by default
#   ( job 0 tests 300 python3 -m pytest -q compile_tests/test_gpu.py -rA
#     job 0 bench 600 python3 -m bsa_flex.bench --part wan --out $OUT/res/bench ) &
#   ( job 1 train 300 python3 examples/train_video_dit.py --arm bsa --out $OUT/res/train ) &
#   wait; job 0,1 ulysses 200 torchrun --nproc-per-node 2 examples/ulysses.py --video 40 48 80 --heads 12 --dim 128
#   cat $OUT/logs/status.txt; finish                 # -> $OUT/res.tgz (logs/ and res/)
#
# job GPUS NAME TIMEOUT CMD...: runs CMD with CUDA_VISIBLE_DEVICES=GPUS, cut at TIMEOUT or the
# deadline, whichever is first; its output goes to $OUT/logs/NAME.log and one status line (exit
# code, seconds) to $OUT/logs/status.txt. The device brings back at most 8 files, hence the tar.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
DEADLINE=$((SECONDS + ${BUDGET:-560}))
left() { echo $((DEADLINE - SECONDS)); }
job() {
  local gpu=$1 name=$2 t=$3; shift 3
  local l; l=$(left); [ "$t" -gt "$l" ] && t=$l
  [ "$t" -le 5 ] && { echo "$name SKIPPED (under 5 s to run)" >> "$OUT/logs/status.txt"; return; }
  local t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 "$t" bash -c "$*" > "$OUT/logs/$name.log" 2>&1
  echo "$name rc=$? limit=${t}s took=$((SECONDS - t0))s" >> "$OUT/logs/status.txt"
}
finish() { (cd "$OUT" && tar czf res.tgz logs res && rm -rf logs res); }
mkdir -p "$OUT/logs" "$OUT/res"
