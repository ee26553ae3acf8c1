#!/usr/bin/env python
"""Per-batch overhead of phaselearn against a hand-written PyTorch loop doing the same work, in one process.

Both sides: same model, data, seed, Adam with weight decay 0 (wd=0 on both sides, so decoupled vs L2 decay does not
matter), one-cycle schedule (phaselearn: `learn.fit_one_cycle`; by hand: `torch.optim.lr_scheduler.OneCycleLR` with the
same lr_max, div=25, div_final=1e5, pct_start=0.25, cosine, momentum 0.95-0.85-0.95), loss accumulated on the device
and read once per epoch, a validation pass with loss and accuracy every epoch. phaselearn runs with its default
callbacks, progress display on (bar and table, written to a discarded stream). Runs alternate after a warm-up;
the script prints medians and asserts nothing.

    python bench/overhead.py            # full run
    python bench/overhead.py --quick    # fewer repetitions
    python bench/overhead.py --no-breakdown

Torch's thread settings are left at their defaults on both sides. (On VMs where OpenMP's spin-waiting stalls, run
with OMP_WAIT_POLICY=PASSIVE for stable numbers; the setting applies to both sides alike.)
"""
import argparse, collections, contextlib, cProfile, io, math, os, pstats, statistics, sys, time, timeit, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from phaselearn.core import set_seed, to_device
from phaselearn.data import DataLoaders
from phaselearn.callback import Callback
from phaselearn.metrics import accuracy
from phaselearn.learner import Learner
try: import phaselearn.phases  # noqa: F401  (adds Learner.fit_one_cycle)
except ImportError: pass

LR_MAX, DIV, DIV_FINAL, PCT_START, MOMS = 1e-2, 25., 1e5, 0.25, (0.95, 0.85, 0.95)
DEVICE = 'cpu'  # --device


# ---------------------------------------------------------------- the two sides

def hand_fit(model, train_dl, valid_dl, epochs):
    "The hand-written loop: Adam + OneCycleLR, device-side loss/accuracy accumulation, one read per epoch."
    opt = torch.optim.Adam(model.parameters(), lr=LR_MAX / DIV, betas=(MOMS[0], 0.999), weight_decay=0.)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR_MAX, total_steps=epochs * len(train_dl), pct_start=PCT_START, anneal_strategy='cos',
        div_factor=DIV, final_div_factor=DIV_FINAL / DIV, base_momentum=MOMS[1], max_momentum=MOMS[0])
    table, device = [], DEVICE
    model.to(device)
    for epoch in range(epochs):
        model.train()
        train_total, train_count = torch.zeros((), device=device), 0
        for xb, yb in train_dl:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step(); sched.step(); opt.zero_grad()
            train_total += loss.detach() * len(yb); train_count += len(yb)
        model.eval()
        valid_total, correct, valid_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
        with torch.no_grad():
            for xb, yb in valid_dl:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                pred = model(xb)
                valid_total += F.cross_entropy(pred, yb) * len(yb)
                correct += (pred.argmax(-1) == yb).sum()
                valid_count += len(yb)
        table.append([epoch, *(torch.stack([train_total / train_count, valid_total / valid_count,
                                            correct / valid_count]).tolist())])
    return table


class OneCycleFallback(Callback):
    "Used only when `learn.fit_one_cycle` is missing: the OneCycleLR schedule (cosine both ways) set every batch."
    order = -50
    def before_batch(self):
        if not self.learn.training: return
        pct = self.learn.train_iter / max(self.learn.total_iter - 1, 1)
        lr_start, lr_end = LR_MAX / DIV, LR_MAX / DIV_FINAL
        def cos(a, b, p): return b + (a - b) * (1 + math.cos(math.pi * p)) / 2
        if pct < PCT_START:
            p = pct / PCT_START
            lr, mom = cos(lr_start, LR_MAX, p), cos(MOMS[0], MOMS[1], p)
        else:
            p = (pct - PCT_START) / (1 - PCT_START)
            lr, mom = cos(LR_MAX, lr_end, p), cos(MOMS[1], MOMS[2], p)
        self.learn.opt.set_hyper('lr', lr); self.learn.opt.set_hyper('mom', mom)


def phaselearn_fit(learn, epochs):
    if hasattr(learn, 'fit_one_cycle'): learn.fit_one_cycle(epochs, lr_max=LR_MAX, div=DIV, div_final=DIV_FINAL,
                                                            pct_start=PCT_START, moms=MOMS)
    else: learn.fit(epochs, cbs=[OneCycleFallback()])
    return learn.recorder.values


def make_learner(model, dls, one_group=False):
    "`one_group`: biases decayed too (bias_wd=True), so the wrapper makes one torch param group, as the hand loop has."
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.Adam, lr=LR_MAX / DIV,
                   metrics=[accuracy], wd=0., true_wd=True, bias_wd=one_group, device=DEVICE)


# ---------------------------------------------------------------- problems

def mlp(): return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
def cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))

def mlp_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(25_000, 20, generator=g)
    y = (x[:, :5].sum(1) + 0.5 * torch.randn(25_000, generator=g) > 0).long()
    return x[:20_000], y[:20_000], x[20_000:], y[20_000:]

def cnn_data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (5_000,), generator=g)
    x = torch.randn(5_000, 1, 28, 28, generator=g) * 0.5
    x[torch.arange(5_000), 0, y * 2 + 4, 4:24] += 2.  # a class-dependent stripe
    return x[:4_000], y[:4_000], x[4_000:], y[4_000:]

class HandGather:
    "What a hand-written in-memory loop does: a fresh permutation per epoch, one gather per tensor per batch."
    def __init__(self, x, y, bs, shuffle): self.x, self.y, self.bs, self.shuffle = x, y, bs, shuffle
    def __len__(self): return math.ceil(len(self.x) / self.bs)
    def __iter__(self):
        order = torch.randperm(len(self.x)) if self.shuffle else torch.arange(len(self.x))
        for i in range(len(self)):
            idx = order[i * self.bs:(i + 1) * self.bs]
            yield self.x[idx], self.y[idx]

def torch_loaders(x, y, xv, yv, bs):
    return (DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True),
            DataLoader(TensorDataset(xv, yv), batch_size=2 * bs, shuffle=False))


# ---------------------------------------------------------------- timing

@contextlib.contextmanager
def discard_output():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()): yield

def _sync():
    if DEVICE != 'cpu': torch.cuda.synchronize()

def time_run(fn):
    with discard_output():
        _sync(); start = time.perf_counter(); fn(); _sync(); return time.perf_counter() - start

def compare(title, model_fn, data, bs, epochs, reps, fast_path, one_group=False, hand_gather=False):
    """Interleaved runs after a warm-up of each side; prints the median ratio and the overhead per batch.
    `hand_gather`: the 'phaselearn' side is replaced by the hand loop on `HandGather` batches (the reference ceiling)."""
    x, y, xv, yv = data
    def hand():
        set_seed(0); model = model_fn(); train_dl, valid_dl = torch_loaders(x, y, xv, yv, bs)
        return time_run(lambda: hand_fit(model, train_dl, valid_dl, epochs))
    def ours():
        set_seed(0); model = model_fn()
        if hand_gather:
            train_dl, valid_dl = HandGather(x, y, bs, True), HandGather(xv, yv, 2 * bs, False)
            return time_run(lambda: hand_fit(model, train_dl, valid_dl, epochs))
        dls = (DataLoaders.from_tensors(x, y, xv, yv, bs=bs, seed=0, device=DEVICE) if fast_path
               else DataLoaders(*torch_loaders(x, y, xv, yv, bs)))
        learn = make_learner(model, dls, one_group)
        return time_run(lambda: phaselearn_fit(learn, epochs))
    hand(); ours()  # warm-up
    hand_times, our_times = [], []
    for i in range(reps):
        for side, times in ((hand, hand_times), (ours, our_times)) if i % 2 == 0 else ((ours, our_times), (hand, hand_times)):
            times.append(side())
    n_batches = epochs * (math.ceil(len(x) / bs) + math.ceil(len(xv) / (2 * bs)))
    ratios = [o / h for o, h in zip(our_times, hand_times)]
    overhead_us = [(o - h) / n_batches * 1e6 for o, h in zip(our_times, hand_times)]
    print(f"{title}\n  hand {statistics.median(hand_times):.3f}s  phaselearn {statistics.median(our_times):.3f}s  "
          f"({reps} interleaved runs, {n_batches} batches each)\n"
          f"  median wall ratio {statistics.median(ratios):.3f}  (min {min(ratios):.3f}, max {max(ratios):.3f});  "
          f"overhead {statistics.median(overhead_us):+.1f} us/batch", flush=True)
    return statistics.median(ratios)


# ---------------------------------------------------------------- syncs

SYNC_METHODS = ('item', 'tolist', 'numpy', '__float__', '__int__', '__bool__', '__index__')

@contextlib.contextmanager
def count_syncs(counts):
    "Count host reads of tensor values made by phaselearn's code (torch.optim's reads of its CPU step counters excluded)."
    saved = {name: torch.Tensor.__dict__.get(name) for name in SYNC_METHODS}
    for name in SYNC_METHODS:
        def wrapper(tensor, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith(('torch/_tensor.py', 'torch/_tensor_str.py')):
                frame = frame.f_back
            if frame is not None and '/phaselearn/' in frame.f_code.co_filename.replace('\\', '/'): counts[_name] += 1
            return _original(tensor, *args, **kwargs)
        setattr(torch.Tensor, name, wrapper)
    try: yield counts
    finally:
        for name, original in saved.items():
            if original is None: delattr(torch.Tensor, name)
            else: setattr(torch.Tensor, name, original)

def sync_report(data, bs, epochs):
    x, y, xv, yv = data
    set_seed(0)
    learn = make_learner(mlp(), DataLoaders.from_tensors(x, y, xv, yv, bs=bs, seed=0, device=DEVICE))
    counts = collections.Counter()
    with discard_output(), count_syncs(counts): phaselearn_fit(learn, epochs)
    n_batches = epochs * (len(learn.dls.train) + len(learn.dls.valid))
    total = sum(counts.values())
    print(f"sync calls by phaselearn in fit_one_cycle({epochs}) with the progress display on (refresh "
          f"{learn.progress.refresh}s): {total} for {n_batches} batches = {total / n_batches:.4f} per batch "
          f"({total / epochs:.1f} per epoch) {dict(counts)}")


# ---------------------------------------------------------------- per-batch breakdown

def per_call_us(fn, number=2000, repeat=5):
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6

def breakdown(data, bs):
    "Micro-timings of each piece of a training batch, on a learner in the middle of a fit (fast path, MLP)."
    x, y, xv, yv = data
    set_seed(0)
    learn = make_learner(mlp(), DataLoaders.from_tensors(x, y, xv, yv, bs=bs, seed=0, device=DEVICE))
    with discard_output(): phaselearn_fit(learn, 1)
    learn.opt.set_hyper('wd', 0.)
    xb, yb = x[:bs].to(DEVICE), y[:bs].to(DEVICE)
    learn.model.train()
    learn.training, learn.epoch, learn.iter, learn.n_iter, learn.train_iter, learn.total_iter = True, 0, 0, 10**9, 0, 10**9
    learn.xb, learn.yb = (xb,), (yb,)
    learn.pred = learn.model(xb); learn.loss_grad = learn.compute_loss(); learn.loss = learn.loss_grad.detach()
    rows = []
    def add(name, us, note=''): rows.append((name, us, note))
    # the data
    it = iter(learn.dls.train); n = len(learn.dls.train)
    def next_fast():
        nonlocal it
        try: return next(it)
        except StopIteration: it = iter(learn.dls.train); return next(it)
    add('TensorLoader batch (fast path: one gather per tensor)', per_call_us(next_fast, number=n * 3))
    tensors, idx = learn.dls.train.tensors, torch.randperm(len(x), device=learn.dls.train.tensors[0].device)[:bs]
    add('  the gathers alone: t[idx] for x and y', per_call_us(lambda: tuple(t[idx] for t in tensors)))
    add('  the same with torch.index_select(t, 0, idx)', per_call_us(lambda: tuple(torch.index_select(t, 0, idx) for t in tensors)))
    torch_dl = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)
    tit = iter(torch_dl)
    def next_torch():
        nonlocal tit
        try: return next(tit)
        except StopIteration: tit = iter(torch_dl); return next(tit)
    add('torch DataLoader batch (TensorDataset, per-sample collate)', per_call_us(next_torch, number=n))
    batch = (xb, yb)
    add('to_device(batch) (already on the device)', per_call_us(lambda: to_device(batch, learn.device)))
    add('tuple slicing of xb / yb', per_call_us(lambda: (tuple(batch[:1]), tuple(batch[1:]))))
    # dispatch
    add('one event dispatch with no handler  (x8 events per train batch)', per_call_us(lambda: learn('after_pred')))
    def contexts():
        with learn._contexts('batch_context'):
            with learn._contexts('forward_context'): pass
    add('_contexts x2 and their two (null) with-blocks', per_call_us(contexts))
    add('compute_loss wrapper (beyond loss_func)', per_call_us(learn.compute_loss) - per_call_us(lambda: learn.loss_func(learn.pred, yb)))
    add('loss_grad.detach()', per_call_us(lambda: learn.loss_grad.detach()))
    # model and optimizer work, for scale
    add('forward + loss (model work, for scale)', per_call_us(lambda: F.cross_entropy(learn.model(xb), yb), number=500))
    def fwd_bwd():
        F.cross_entropy(learn.model(xb), yb).backward()
    add('forward + loss + backward (model work, for scale)', per_call_us(fwd_bwd, number=300))
    fwd_bwd()
    opt = learn.opt
    one_group = torch.optim.Adam([p for group in opt.param_groups for p in group['params']], lr=1e-3, betas=(0.95, 0.999))
    add(f'torch Adam.step(), the wrapper\'s {len(opt.param_groups)} param groups (decayed / exempt)',
        per_call_us(lambda: opt.opt.step(), number=500))
    add('torch Adam.step(), the same parameters in 1 param group (hand side)', per_call_us(lambda: one_group.step(), number=500))
    add('OptimWrapper.step() beyond the inner step: _decoupled_decay, wd=0', per_call_us(opt._decoupled_decay))
    opt.set_hyper('wd', 0.01)
    add('OptimWrapper.step() beyond the inner step: _decoupled_decay, wd=0.01', per_call_us(opt._decoupled_decay, number=500))
    opt.set_hyper('wd', 0.)
    add('OptimWrapper.zero_grad() (grads already None)', per_call_us(lambda: opt.zero_grad()))
    add('torch Optimizer.zero_grad() (hand side, same state)', per_call_us(lambda: one_group.zero_grad()))
    add('opt.set_hyper(lr, float)', per_call_us(lambda: opt.set_hyper('lr', 1e-3)))
    add('opt.set_hyper(mom, float) (rebuilds the betas tuple)', per_call_us(lambda: opt.set_hyper('mom', 0.9)))
    hand_opt = torch.optim.Adam(learn.model.parameters(), lr=1e-3)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(hand_opt, max_lr=LR_MAX, total_steps=10**8)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        add('hand side: OneCycleLR.step() (for comparison)', per_call_us(one_cycle.step))
    try:
        from phaselearn.phases import PhaseScheduler, OneCycle, Phases
        phases = Phases(OneCycle(LR_MAX).phases(3))
        sched_cb = PhaseScheduler(phases, phases.lengths(len(learn.dls.train)))
        sched_cb.learn = learn; sched_cb.before_fit(); learn.epoch = 0; sched_cb.before_epoch()
        add('PhaseScheduler.before_batch (OneCycle: lr + mom schedules)', per_call_us(sched_cb.before_batch))
    except ImportError: pass
    # callbacks
    for cb in learn.cbs:
        if getattr(type(cb), 'after_batch', None) is not None:
            if type(cb).__name__ == 'ProgressCallback':
                with discard_output():
                    cb.before_fit(); cb.before_train(); us = per_call_us(cb.after_batch, number=20000); cb._close_bar()
                add('ProgressCallback.after_batch (bar open, throttled)', us)
            elif type(cb).__name__ == 'Recorder':
                add('Recorder.after_batch (train)', per_call_us(cb.after_batch))
                learn.training = False
                add('Recorder.after_batch (valid, + accuracy)', per_call_us(cb.after_batch)); learn.training = True
                cb.before_fit()
            else: add(f'{type(cb).__name__}.after_batch', per_call_us(cb.after_batch))
    # whole batch
    learn.train_iter = 0
    def whole():
        learn.iter = 0; learn._do_batch(batch)
    add('Learner._do_batch, whole training batch (fast path data excluded)', per_call_us(whole, number=500))
    def hand_batch():
        loss = F.cross_entropy(learn.model(xb), yb); loss.backward(); hand_opt.step(); one_cycle.step(); hand_opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        add('hand batch: forward, loss, backward, Adam, OneCycleLR, zero_grad', per_call_us(hand_batch, number=500))
    print(f"\nper-batch cost breakdown (us of host time per call, min of 5 repeats; MLP 20->32->2, bs 64, {DEVICE}):")
    for name, us, note in rows: print(f"  {us:8.2f}  {name}" + (f"  [{note}]" if note else ''))
    # cProfile of a whole fit, for the record
    set_seed(0)
    learn = make_learner(mlp(), DataLoaders.from_tensors(x, y, xv, yv, bs=bs, seed=0, device=DEVICE))
    with discard_output(): phaselearn_fit(learn, 1)
    profiler = cProfile.Profile()
    with discard_output():
        profiler.enable(); phaselearn_fit(learn, 2); profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats('tottime').print_stats(18)
    print("\ncProfile of fit_one_cycle(2), fast path, by own time (profiling inflates Python calls):")
    print('\n'.join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='fewer repetitions')
    parser.add_argument('--no-breakdown', action='store_true', help='skip the per-batch breakdown and profile')
    parser.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda': both sides train there")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    reps_a, reps_b = (3, 2) if args.quick else (9, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if DEVICE != 'cpu' else ''}; schedule: "
          f"{'learn.fit_one_cycle' if hasattr(Learner, 'fit_one_cycle') else 'fallback OneCycle callback (fit_one_cycle missing)'}"
          f" vs torch OneCycleLR; Adam, wd=0 on both sides")
    data = mlp_data()
    a1 = compare("(a) MLP 20->32->2, 20,000 train + 5,000 valid samples, bs 64, 3 epochs + validation; same torch DataLoader on both sides",
                 mlp, data, 64, 3, reps_a, fast_path=False)
    if not args.quick:
        compare("(a') as (a) same DataLoader, but bias_wd=True: the wrapper's torch param groups 2 -> 1, as in the hand loop "
                "(wd=0, so the training is the same)", mlp, data, 64, 3, reps_a, fast_path=False, one_group=True)
    a2 = compare("(a) same, phaselearn on its in-memory fast path (DataLoaders.from_tensors) vs the hand loop's DataLoader",
                 mlp, data, 64, 3, reps_a, fast_path=True)
    if not args.quick:
        compare("(ref) the hand loop itself on hand-written in-memory gathers vs the same hand loop on its DataLoader "
                "(the best an in-memory path can do here: the 'phaselearn' column is the hand gather loop)",
                mlp, data, 64, 3, reps_a, fast_path=False, hand_gather=True)
    b = compare("(b) small CNN, 4,000 1x28x28 images, bs 64, 2 epochs + validation; same torch DataLoader",
                cnn, cnn_data(), 64, 2, reps_b, fast_path=False)
    print(f"\ntargets: (a) same DataLoader {a1:.3f} (target <= 1.05), (a) fast path {a2:.3f} (<= 0.70), "
          f"(b) {b:.3f} (<= 1.02)")
    sync_report(data, 64, 3)
    if not args.no_breakdown: breakdown(data, 64)


if __name__ == '__main__': main()
