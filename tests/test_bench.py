"The benchmark scripts run on the CPU: the GPU script end to end in its dry-run mode (every case builds and trains a step or two), the instruction counter's worker."
import os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run():
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PATH': f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    out = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu.sh'), '--dry-run'], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for expected in ('phaselearn, progress on / hand loop', 'fast path, progress on / gather loop', 'CNN: phaselearn / hand loop',
                     'x hand', 'lm: batch', 'ratio phaselearn compiled / hand compiled', 'dry run finished'):
        assert expected in text, f"{expected!r} missing from the dry run's output:\n{text[-3000:]}"
    assert 'FAILED' not in text, text[-3000:]


def test_instruction_count_worker_runs():
    "bench/instructions.py's worker (what callgrind runs) fits both sides of a problem; the counting itself needs valgrind."
    for side in ('hand', 'ours_quiet'):
        out = subprocess.run([sys.executable, str(ROOT / 'bench' / 'instructions.py'), '--worker', 'bf16', side, '3'], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
