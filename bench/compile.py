#!/usr/bin/env python
"""phaselearn compiled (`learn.compile(step=True)`: model and optimizer step) against a hand-written compiled loop doing
the same work, and each against its eager self.

Both sides: an MLP (784 -> 256 -> 256 -> 10, GELU) on 8,192 in-memory samples, bs 128, 2 epochs of one-cycle Adam
(lr and betas[0] change every batch) with a validation pass. The hand loop is what torch's documentation advises for a
compiled optimizer with a schedule: `torch.compile(model)`, a compiled function around `opt.step()`, lr and beta1 held
in 0-d tensors filled each batch, batches gathered from the tensors by a random permutation. phaselearn runs its
default callbacks (progress written to a discarded stream) on `DataLoaders.from_tensors`.

Backend: inductor where a C compiler is found (`cc`/`gcc` on PATH, needed for CPU code) or on CUDA, else aot_eager;
`--backend` overrides. Each side compiles during an untimed first fit; the timed fits follow, interleaved (median of `--reps`).

    OMP_NUM_THREADS=1 python bench/compile.py
    python bench/compile.py --device cuda
    python bench/compile.py --dry-run        # tiny, backend eager, one rep: checks that everything runs
"""
import argparse, contextlib, io, math, shutil, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch import nn
import torch.nn.functional as F
from phaselearn.all import *

LR_MAX, DIV, DIV_FINAL, PCT_START, MOMS = 3e-3, 25., 1e5, 0.25, (0.95, 0.85, 0.95)


def make_model(width):
    return nn.Sequential(nn.Linear(784, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))


def make_data(n, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 784, generator=g)
    y = (x[:, :10].argmax(1) + (x[:, 10:20].sum(1) > 0).long()) % 10
    n_valid = n // 8
    return tuple(t.to(device) for t in (x[n_valid:], y[n_valid:], x[:n_valid], y[:n_valid]))


def one_cycle(pct):
    "lr and beta1 of fastai's one-cycle (cosine pieces) at `pct` in [0, 1], as phaselearn's OneCycle gives them."
    def cos(a, b, p): return b + (a - b) * (1 + math.cos(math.pi * p)) / 2
    if pct < PCT_START:
        p = pct / PCT_START
        return cos(LR_MAX / DIV, LR_MAX, p), cos(MOMS[0], MOMS[1], p)
    p = (pct - PCT_START) / (1 - PCT_START)
    return cos(LR_MAX, LR_MAX / DIV_FINAL, p), cos(MOMS[1], MOMS[2], p)


def hand_fit(model, data, bs, epochs, compiled, backend):
    "The hand-written loop, built once (a function running one fit); `compiled`: model and step compiled, lr and beta1 in tensors."
    x, y, xv, yv = data
    device = x.device
    lr, betas = torch.tensor(LR_MAX / DIV), (torch.tensor(MOMS[0]), torch.tensor(0.999))
    opt = torch.optim.Adam(model.parameters(), lr=lr if compiled else LR_MAX / DIV, betas=betas if compiled else (MOMS[0], 0.999))
    if compiled:
        model = torch.compile(model, backend=backend)
        @torch.compile(backend=backend)
        def step(): opt.step()
    else: step = opt.step
    n_train = math.ceil(len(x) / bs); total = epochs * n_train
    def fit():
        for epoch in range(epochs):
            model.train()
            order, train_loss = torch.randperm(len(x), device=device), torch.zeros((), device=device)
            for i in range(n_train):
                pct_lr, pct_mom = one_cycle((epoch * n_train + i) / total)
                if compiled: lr.fill_(pct_lr); betas[0].fill_(pct_mom)
                else:
                    for g in opt.param_groups: g['lr'], g['betas'] = pct_lr, (pct_mom, 0.999)
                idx = order[i * bs:(i + 1) * bs]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward(); step(); opt.zero_grad()
                train_loss += loss.detach()
            model.eval()
            correct = torch.zeros((), device=device)
            with torch.no_grad():
                for i in range(0, len(xv), 2 * bs): correct += (model(xv[i:i + 2 * bs]).argmax(1) == yv[i:i + 2 * bs]).sum()
            print(epoch, (train_loss / n_train).item(), (correct / len(xv)).item())
    return fit


def phaselearn_fit(model, data, bs, epochs, compiled, backend):
    x, y, xv, yv = data
    dls = DataLoaders.from_tensors(x, y, xv, yv, bs=bs, seed=0, device=x.device)
    learn = Learner(dls, model, loss_func=F.cross_entropy, opt_func=torch.optim.Adam, lr=LR_MAX / DIV, metrics=[accuracy],
                    device=x.device)
    if compiled: learn.compile(step=True, backend=backend)
    return lambda: learn.fit_one_cycle(epochs, lr_max=LR_MAX, div=DIV, div_final=DIV_FINAL, pct_start=PCT_START, moms=MOMS)


def timed(fn, device):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if device.type == 'cuda': torch.cuda.synchronize()
        start = time.perf_counter(); fn()
        if device.type == 'cuda': torch.cuda.synchronize()
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--backend', default=None, help='torch.compile backend (default: inductor when it can run, else aot_eager)')
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--dry-run', action='store_true', help='tiny sizes, backend eager, one rep')
    args = parser.parse_args()
    device = torch.device(args.device)
    has_cc = bool(shutil.which('cc') or shutil.which('gcc'))
    backend = args.backend or ('eager' if args.dry_run else 'inductor' if device.type == 'cuda' or has_cc else 'aot_eager')
    n, width, bs, epochs, reps = (1024, 64, 256, 1, 1) if args.dry_run else (8_192, 256, 128, 2, args.reps)
    data = make_data(n, device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), backend {backend} "
          f"(C compiler {'found' if has_cc else 'not found'}); MLP width {width}, {n} samples, bs {bs}, {epochs} epochs, "
          f"median of {reps}", flush=True)
    runs, sides = {}, {}
    for name in ('hand', 'phaselearn'):
        for compiled in (False, True):
            set_seed(0); model = make_model(width).to(device)
            run = runs[name, compiled] = (hand_fit if name == 'hand' else phaselearn_fit)(model, data, bs, epochs, compiled, backend)
            first = timed(run, device)  # compiles (when compiled) and warms up
            print(f"  {name:10s} {'compiled' if compiled else 'eager':8s} first fit (compiling) {first:7.2f}s", flush=True)
    keys, times = list(runs), {key: [] for key in runs}
    for rep in range(reps):  # interleaved, the order rotated each time: load changes hit every side alike
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]: times[key].append(timed(runs[key], device))
    for key in keys:
        sides[key] = statistics.median(times[key])
        print(f"  {key[0]:10s} {'compiled' if key[1] else 'eager':8s} {sides[key]:.3f}s per fit (median)")
    print(f"ratio phaselearn compiled / hand compiled: {sides['phaselearn', True] / sides['hand', True]:.3f}")
    print(f"ratio phaselearn eager / hand eager:       {sides['phaselearn', False] / sides['hand', False]:.3f}")
    print(f"ratio compiled / eager, hand:              {sides['hand', True] / sides['hand', False]:.3f}")
    print(f"ratio compiled / eager, phaselearn:        {sides['phaselearn', True] / sides['phaselearn', False]:.3f}")


if __name__ == '__main__': main()
