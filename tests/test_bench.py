"The GPU benchmark script runs end to end on the CPU in its dry-run mode: every case builds and trains a step or two."
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
