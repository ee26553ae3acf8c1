#!/usr/bin/env python
"""What the trackers chapter's callbacks add to a fit: the MLP problem of bench/overhead.py (20,000 samples, bs 64,
in-memory loaders, default callbacks with the progress display on, output discarded), fitted with and without
`MLflowCallback` (a SQLite store), `ThroughputCallback` (FLOPs counted on the first batch) and `OptunaPruningCallback`
(`--wandb` adds `WandbCallback` in offline mode).

Every round runs both sides in one process, in alternating order, each on a fresh learner; the table shows the median
over rounds of the ratio tracked / plain, of wall time and of process CPU time (the CPU-time ratio is the steadier one
on a shared machine). A run's fixed costs (opening and closing the run, logging the parameters and the plan's preview
plot, the one batch whose FLOPs are counted) are timed apart, in the callbacks' `before_fit` and `after_fit` and around that
batch, and shown with the per-batch remainder.

    python bench/trackers_overhead.py [--rounds 5] [--epochs 3] [--wandb]
"""
import argparse, contextlib, io, os, statistics, sys, tempfile, time, warnings
import torch
from torch import nn
from phaselearn.all import *
from phaselearn.trackers import MLflowCallback, WandbCallback, ThroughputCallback, OptunaPruningCallback


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(25_000, 20, generator=g)
    y = (x[:, :5].sum(1) + 0.5 * torch.randn(25_000, generator=g) > 0).long()
    return x[:20_000], y[:20_000], x[20_000:], y[20_000:]


def timed(cb, name, totals, bucket='fixed'):
    "Wrap `cb.name` so that its time adds to `totals[bucket]` (set on the instance before the callback is attached)."
    method = getattr(cb, name)
    def wrapper():
        start = time.perf_counter()
        try: return method()
        finally: totals[bucket] += time.perf_counter() - start
    setattr(cb, name, wrapper)


def timed_flop_count(cb, totals):
    "Add the batch `ThroughputCallback` runs under `FlopCounterMode` (once per fit, every op intercepted) to the fixed costs."
    method = cb.batch_context
    def wrapper():
        context = method()
        if context is cb._null: return context
        @contextlib.contextmanager
        def timed():
            start = time.perf_counter()
            try:
                with context: yield
            finally: totals['fixed'] += time.perf_counter() - start
        return timed()
    cb.batch_context = wrapper


def one_fit(tensors, epochs, tracked, folder, use_wandb, totals):
    import optuna
    set_seed(0)
    learn = Learner(DataLoaders.from_tensors(*tensors, bs=64, seed=0), nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)),
                    loss_func=nn.CrossEntropyLoss(), metrics=[accuracy], wd=0., path=folder)
    cbs = []
    if tracked:
        cbs = [MLflowCallback(tracking_uri=f"sqlite:///{folder}/mlflow.db", experiment='bench',
                              artifact_location=f"{folder}/artifacts"), ThroughputCallback(),
               OptunaPruningCallback(optuna.create_study(pruner=optuna.pruners.NopPruner()).ask())]
        if use_wandb: cbs.append(WandbCallback(mode='offline', dir=folder))
        for cb in cbs[:1] + cbs[3:]:
            timed(cb, 'before_fit', totals); timed(cb, 'after_fit', totals)
        timed_flop_count(cbs[1], totals)
        for cb in cbs:  # what the trackers do per training batch, timed where it runs
            if hasattr(type(cb), 'after_batch'): timed(cb, 'after_batch', totals, 'batch')
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        wall, cpu = time.perf_counter(), time.process_time()
        learn.fit_one_cycle(epochs, lr_max=1e-2, cbs=cbs)
        return time.perf_counter() - wall, time.process_time() - cpu, sum(learn.epoch_lengths) + epochs * len(learn.dls.valid)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--wandb', action='store_true', help='also log to W&B (offline mode)')
    args = parser.parse_args()
    os.environ.setdefault('WANDB_SILENT', 'true')
    warnings.simplefilter('ignore')
    import optuna; optuna.logging.set_verbosity(optuna.logging.WARNING)
    tensors = data()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; {args.rounds} rounds, fit_one_cycle({args.epochs}) per side", flush=True)
    walls, cpus, per_batch, fixed_share, remainder, hooks = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        one_fit(tensors, 1, True, folder, args.wandb, {'fixed': 0., 'batch': 0.})  # warm-up: imports, database tables
        for r in range(args.rounds):
            results, totals = {}, {'fixed': 0., 'batch': 0.}
            for side in ((False, True) if r % 2 == 0 else (True, False)):
                results[side] = one_fit(tensors, args.epochs, side, folder, args.wandb, totals)
            (w0, c0, n), (w1, c1, _) = results[False], results[True]
            walls.append(w1 / w0); cpus.append(c1 / c0)
            per_batch.append((w1 - totals['fixed'] - w0) / n * 1e6)
            fixed_share.append(totals['fixed'])
            remainder.append((w1 - totals['fixed']) / w0)
            hooks.append(totals['batch'] / w0)
            print(f"  round {r + 1}: plain {w0:.2f}s, tracked {w1:.2f}s wall (of which {totals['fixed']:.2f}s fixed: "
                  f"opening/closing the run, the FLOP count), {n} batches", flush=True)
    print(f"\ntracked / plain, median over rounds: wall {statistics.median(walls):.3f}, cpu {statistics.median(cpus):.3f}")
    print(f"fixed cost per fit (open, params, preview plot, FLOP-counted batch, close): {statistics.median(fixed_share):.3f}s; "
          f"per-batch remainder {statistics.median(per_batch):+.1f} us/batch "
          f"(tracked without the fixed cost / plain: {statistics.median(remainder):.3f})")
    print(f"time inside the trackers' after_batch / plain fit: {statistics.median(hooks):.4f}")


if __name__ == '__main__': main()
