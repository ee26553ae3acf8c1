#!/usr/bin/env python
"""Instructions per training batch, phaselearn against the hand-written loop of bench/overhead.py, counted by valgrind's
callgrind: a deterministic complement to the timings, which on a shared machine move by a few percent from run to run.

Each side runs in its own process under callgrind, twice: with `--batches` training batches (default 60 and 160) and
5 validation batches, each process fitting twice. The difference between the two processes' totals, divided by the
extra training batches of both fits, is the cost of one training batch, free of imports and of each fit's fixed costs.
Every process hashes strings with the same seed (PYTHONHASHSEED=0): dict layouts, and the instructions spent probing
them, are then the same in the processes compared. The display is off on every side ('*_quiet'): under callgrind a fit
runs ~50 times slower, so a display refreshed by the clock would redraw ~50 times more often per batch than in a real
fit. What is left of the run-to-run spread (garbage collections, allocator state) is about +-10,000 instructions per
batch: compare differences larger than that.

    python bench/instructions.py                         # groups16 and bf16, about 10 minutes on 2 cores
    python bench/instructions.py --problems mlp --pairs hand_gather:fast_quiet

Needs valgrind (Debian: apt-get install valgrind). Asserts nothing.
"""
import argparse, os, re, shutil, subprocess, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(problem: str, side: str, n_batches: int):
    "Two fits of `side` on `n_batches` training batches of `problem` (5 validation batches): the warm-up, then the counted one."
    sys.path.insert(0, str(HERE.parent)); sys.path.insert(0, str(HERE.parents[1]))
    import overhead
    model_fn, data_fn, bs, _ = overhead.PROBLEMS[problem]
    x, y, xv, yv = data_fn()
    overhead._data_cache[problem] = (x[:bs * n_batches], y[:bs * n_batches], xv[:2 * bs * 5], yv[:2 * bs * 5])
    for _ in range(2): overhead.time_run(overhead.build(f'{problem}/{side}', epochs=1))


def count(problem: str, side: str, n_batches: int, folder: Path) -> int:
    "Instructions executed by one worker process under callgrind (its 'totals' line)."
    out = folder / f'{problem}.{side}.{n_batches}.callgrind'
    cmd = ['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}', sys.executable, str(HERE),
           '--worker', problem, side, str(n_batches)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONHASHSEED': '0'})
    if run.returncode != 0: raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    return int(re.search(r'^totals: (\d+)', out.read_text(), re.M).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--problems', default='groups16,bf16', help="problems of bench/overhead.py: mlp, cnn, groups16, bf16")
    parser.add_argument('--pairs', default='hand:ours_quiet', help="hand side:phaselearn side, comma-separated")
    parser.add_argument('--batches', default='60,160', help='the two training-batch counts')
    parser.add_argument('--worker', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker: return worker(args.worker[0], args.worker[1], int(args.worker[2]))
    if shutil.which('valgrind') is None: sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    low, high = (int(n) for n in args.batches.split(','))
    pairs = [tuple(p.split(':')) for p in args.pairs.split(',')]
    jobs = [(problem, side, n) for problem in args.problems.split(',') for pair in pairs for side in pair for n in (low, high)]
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: count(*job, Path(folder)), jobs)))
    print(f"instructions per training batch (callgrind; {low} and {high} training batches, 2 fits per process)")
    print(f"{'problem':10s} {'hand side':12s} {'phaselearn side':16s} {'hand':>12s} {'phaselearn':>12s} {'extra':>10s} {'ratio':>7s}")
    for problem in args.problems.split(','):
        for hand, ours in pairs:
            per = {side: (totals[(problem, side, high)] - totals[(problem, side, low)]) / (2 * (high - low)) for side in (hand, ours)}
            print(f"{problem:10s} {hand:12s} {ours:16s} {per[hand]:12,.0f} {per[ours]:12,.0f} {per[ours] - per[hand]:+10,.0f} "
                  f"{per[ours] / per[hand]:7.4f}")


if __name__ == '__main__': main()
