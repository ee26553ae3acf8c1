#!/usr/bin/env bash
# One command for a machine with CUDA GPUs (under 7 minutes): phaselearn against hand-written loops, as ratios.
#   1. per-batch overhead on CUDA (bench/overhead.py: same DataLoader, fast path, CNN; peak memory)
#   2. bf16 autocast and fp16 + GradScaler through phaselearn against a hand-written autocast loop ('x hand',
#      target >= 0.98) on compute-bound models (CNN batch 256, transformer block, small transformer LM), and classic
#      fp16 with fp32 master weights ('fp16-master') against fp32 ('x fp32') (bench/precision.py --vs-hand)
#   3. compiled against eager, and phaselearn compiled against a hand-written compiled loop (bench/compile.py)
#   4. FSDP2 over NCCL on every visible GPU (one GPU: sharded over one rank), fp32 and bf16 MixedPrecisionPolicy:
#      phaselearn's FSDPCallback fit against a hand-written FSDP2 loop with the same fully_shard calls (bench/fsdp.py)
#
#   bash bench/gpu.sh             # on the GPU machine, from anywhere
#   bash bench/gpu.sh --dry-run   # on a CPU: builds every case and runs it for a batch or two (numbers meaningless)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
filter() { grep -v -e '^W[0-9]' -e 'Warning' -e 'warnings.warn' || true; }  # torch's compile/profiler log lines

if [[ "${1:-}" == "--dry-run" ]]; then
  echo "== dry run on the CPU: every case builds and runs; the numbers mean nothing"
  python bench/overhead.py --dry-run 2>&1 | filter
  python bench/precision.py --cpu-smoke --vs-hand --steps 1 --warmup 1 2>&1 | filter
  python bench/compile.py --dry-run 2>&1 | filter
  python -m torch.distributed.run --standalone --nproc_per_node 2 bench/fsdp.py --rounds 1 --samples 256 2>&1 | filter | grep ratio
  echo "dry run finished"
  exit 0
fi

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU (or --dry-run)')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "== 1. overhead on CUDA (ratios to hand-written loops; targets as on the CPU)"
timeout 150 python bench/overhead.py --device cuda --rounds 2 2>&1 | filter | grep -e 'ratio' -e ' / ' -e 'targets' -e '^torch' \
  || echo "   (overhead: stopped at its 150 s limit or failed)"
echo "== 2. precision: 'x hand' = phaselearn / hand-written autocast loop (target >= 0.98), 'x fp32' = against phaselearn fp32"
timeout 80 python bench/precision.py --vs-hand --steps 40 --warmup 10 2>&1 | filter || echo "   (precision: stopped at its 80 s limit or failed)"
echo "== 3. torch.compile (inductor): compiled vs eager, phaselearn vs a hand-written compiled loop"
timeout 60 python bench/compile.py --device cuda --reps 2 2>&1 | filter | grep -e '^ratio' -e '^torch' \
  || echo "   (compile: stopped at its 60 s limit or failed)"
echo "== 4. FSDP2 over NCCL: phaselearn FSDPCallback / hand-written FSDP2 loop (same fully_shard calls), fp32 then bf16"
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
for precision in "" "--bf16"; do
  timeout 60 python -m torch.distributed.run --standalone --nproc_per_node "$ngpu" bench/fsdp.py --rounds 2 \
      --dim 512 --layers 6 --heads 8 --samples 16384 --bs 256 $precision 2>&1 | filter | grep -e 'ratio' \
    || echo "   (fsdp ${precision:-fp32}: stopped at its 60 s limit or failed)"
done
