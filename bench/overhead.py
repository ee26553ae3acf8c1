#!/usr/bin/env python
"""Per-batch overhead of phaselearn against hand-written PyTorch loops doing the same work: a table of ratios with
the issue-13 targets, met or not.

Every side: same model, data, seed, Adam with weight decay 0, one-cycle schedule (phaselearn: `learn.fit_one_cycle`;
by hand: `torch.optim.lr_scheduler.OneCycleLR` with the same lr_max, div=25, div_final=1e5, pct_start=0.25, cosine,
momentum 0.95-0.85-0.95), loss accumulated on the device and read once per epoch, a validation pass with loss and
accuracy every epoch. phaselearn runs with its default callbacks; 'progress on' means the bar and the epoch table
(written to a discarded stream, as the hand loop's tqdm bar is).

Runs: `--rounds` fresh processes (default 5); each warms every case up, then times every case twice in an order
rotated from round to round, keeping the faster of the two; a ratio is taken within a round (same process, same
minute) and the table shows the median over rounds, of wall time and of process CPU time (the CPU-time ratio is the
steadier one on a shared machine; the targets are read on wall time). Peak memory: one fresh process per side, the
process's peak resident set during the fit (Linux VmHWM, reset after a warm-up fit), and its rise above the resident
set before the fit; on CUDA `torch.cuda.max_memory_allocated` the same way. Asserts nothing; set OMP_NUM_THREADS=1 for steadier numbers.

    OMP_NUM_THREADS=1 python bench/overhead.py             # a few minutes on 2 quiet cores
    python bench/overhead.py --quick                       # 3 rounds
    python bench/overhead.py --device cuda                 # every side on the GPU
    python bench/overhead.py --syncs                       # also count host reads per batch
    python bench/overhead.py --no-memory --no-checkpoint   # the timing rows only
"""
import argparse, collections, contextlib, io, json, math, os, statistics, subprocess, sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm
from phaselearn.core import set_seed, to_device
from phaselearn.data import DataLoaders, epoch_permutation
from phaselearn.callback import Callback
from phaselearn.metrics import accuracy
from phaselearn.learner import Learner
from phaselearn.optimizer import sequential_splitter, spread_values
import phaselearn.mixed_precision  # noqa: F401  (adds Learner.to_bf16)
try: import phaselearn.phases  # noqa: F401  (adds Learner.fit_one_cycle)
except ImportError: pass

LR_MAX, DIV, DIV_FINAL, PCT_START, MOMS = 1e-2, 25., 1e5, 0.25, (0.95, 0.85, 0.95)
SEED = 0  # the data order of every side: the same batches, so the same computation (costs such as max-pooling's depend on the values)
DEVICE = 'cpu'  # --device
DRY_RUN = False  # --dry-run: every case built and run on a few batches, numbers meaningless


# ---------------------------------------------------------------- the two sides

def hand_fit(model, train_dl, valid_dl, epochs, bar=False, layer_groups=False, amp=None):
    """The hand-written loop: Adam + OneCycleLR, device-side loss/accuracy accumulation, one read per epoch; `bar`: a tqdm
    bar per pass; `layer_groups`: one torch param group per top-level child with parameters, discriminative max_lr
    (the values phaselearn spreads `slice(LR_MAX / 100, LR_MAX)` into); `amp`: autocast to that dtype around each
    training batch's forward and loss, and once around the whole validation pass."""
    if layer_groups:
        groups = [{'params': list(c.parameters())} for c in model.children() if list(c.parameters())]
        max_lr = spread_values(slice(LR_MAX / 100, LR_MAX), len(groups))
    else: groups, max_lr = model.parameters(), LR_MAX
    opt = torch.optim.Adam(groups, lr=LR_MAX / DIV, betas=(MOMS[0], 0.999), weight_decay=0.)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=epochs * len(train_dl), pct_start=PCT_START, anneal_strategy='cos',
        div_factor=DIV, final_div_factor=DIV_FINAL / DIV, base_momentum=MOMS[1], max_momentum=MOMS[0])
    table, device = [], DEVICE
    model.to(device)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=amp)) if amp is not None else contextlib.nullcontext
    for epoch in range(epochs):
        model.train()
        train_total, train_count = torch.zeros((), device=device), 0
        for xb, yb in (tqdm(train_dl, leave=False) if bar else train_dl):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with autocast(): loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step(); sched.step(); opt.zero_grad()
            train_total += loss.detach() * len(yb); train_count += len(yb)
        model.eval()
        valid_total, correct, valid_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
        with torch.no_grad(), autocast():
            for xb, yb in (tqdm(valid_dl, leave=False) if bar else valid_dl):
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


def phaselearn_fit(learn, epochs, lr_max=LR_MAX):
    if hasattr(learn, 'fit_one_cycle'): learn.fit_one_cycle(epochs, lr_max=lr_max, div=DIV, div_final=DIV_FINAL,
                                                            pct_start=PCT_START, moms=MOMS)
    else: learn.fit(epochs, cbs=[OneCycleFallback()])
    return learn.recorder.values


def make_learner(model, dls, one_group=False, splitter=None):
    "`one_group`: biases decayed too (bias_wd=True), so the wrapper makes one torch param group, as the hand loop has."
    return Learner(dls, model, loss_func=F.cross_entropy, opt_func=torch.optim.Adam, lr=LR_MAX / DIV,
                   metrics=[accuracy], wd=0., true_wd=True, bias_wd=one_group, device=DEVICE, splitter=splitter)


# ---------------------------------------------------------------- problems

def mlp(): return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
def deep():
    "16 linear layers: 16 layer groups under `sequential_splitter`, one torch param group each."
    return nn.Sequential(nn.Linear(20, 32), *[nn.Sequential(nn.ReLU(), nn.Linear(32, 32)) for _ in range(14)], nn.ReLU(), nn.Linear(32, 2))
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
    """What a hand-written in-memory loop does: a fresh permutation per epoch, one gather per tensor per batch. The
    permutations are those of `DataLoaders.from_tensors(..., seed=SEED)`, so both sides train on the same batches."""
    def __init__(self, x, y, bs, shuffle): self.x, self.y, self.bs, self.shuffle, self.epoch = x, y, bs, shuffle, 0
    def __len__(self): return math.ceil(len(self.x) / self.bs)
    def __iter__(self):
        n, device = len(self.x), self.x.device
        order = (epoch_permutation(n, SEED, self.epoch).to(device) if self.shuffle else torch.arange(n, device=device))
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.bs:(i + 1) * self.bs]
            yield self.x[idx], self.y[idx]

def torch_loaders(x, y, xv, yv, bs):
    "A shuffled training DataLoader with its own generator, seeded alike on every side (the same batches), and a validation one."
    return (DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(SEED)),
            DataLoader(TensorDataset(xv, yv), batch_size=2 * bs, shuffle=False))


# ---------------------------------------------------------------- cases and timing

@contextlib.contextmanager
def discard_output():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()): yield

def _sync():
    if DEVICE != 'cpu': torch.cuda.synchronize()

def time_run(fn):
    "Wall and process CPU seconds of `fn()`, output discarded."
    with discard_output():
        _sync(); wall, cpu = time.perf_counter(), time.process_time()
        fn(); _sync()
        return time.perf_counter() - wall, time.process_time() - cpu

PROBLEMS = {  # name: (model factory, data factory, bs, epochs)
    'mlp': (mlp, mlp_data, 64, 3),
    'cnn': (cnn, cnn_data, 64, 2),
    'groups16': (deep, mlp_data, 64, 1),   # 16 layer groups, discriminative lr: slice(LR_MAX / 100, LR_MAX)
    'bf16': (mlp, mlp_data, 64, 1),        # learn.to_bf16() against autocast by hand (once per validation pass)
}
SIDES = ('hand', 'hand_tqdm', 'hand_gather', 'ours_quiet', 'ours', 'fast_quiet', 'fast')
_data_cache = {}

def build(case, epochs=None):
    "A zero-argument function running one whole fit of `case` ('problem/side'), everything built beforehand; `epochs`: fewer than the problem's."
    problem, side = case.split('/')
    model_fn, data_fn, bs, problem_epochs = PROBLEMS[problem]
    epochs = epochs or problem_epochs
    if problem not in _data_cache: _data_cache[problem] = data_fn()
    x, y, xv, yv = _data_cache[problem]
    if DRY_RUN: x, y, xv, yv, epochs = x[:2 * bs], y[:2 * bs], xv[:2 * bs], yv[:2 * bs], 1
    set_seed(0); model = model_fn()
    if side.startswith('hand'):
        if side == 'hand_gather':
            xd, yd, xvd, yvd = (t.to(DEVICE) for t in (x, y, xv, yv))
            train_dl, valid_dl = HandGather(xd, yd, bs, True), HandGather(xvd, yvd, 2 * bs, False)
        else: train_dl, valid_dl = torch_loaders(x, y, xv, yv, bs)
        return lambda: hand_fit(model, train_dl, valid_dl, epochs, bar=side == 'hand_tqdm', layer_groups=problem == 'groups16',
                                amp=torch.bfloat16 if problem == 'bf16' else None)
    dls = (DataLoaders.from_tensors(x, y, xv, yv, bs=bs, seed=SEED, device=DEVICE) if side.startswith('fast')
           else DataLoaders(*torch_loaders(x, y, xv, yv, bs)))
    learn = make_learner(model, dls, splitter=sequential_splitter if problem == 'groups16' else None)
    if problem == 'bf16': learn.to_bf16()
    if side.endswith('quiet'): learn.progress.show_bar = learn.progress.show_table = False
    lr_max = slice(LR_MAX / 100, LR_MAX) if problem == 'groups16' else LR_MAX
    return lambda: phaselearn_fit(learn, epochs, lr_max)

def worker(cases, order_shift, repeats=2):
    "One round: warm every case up (a one-epoch fit), then time each `repeats` times in a rotated order; the best time of each case."
    runs = {case: build(case, epochs=1) for case in cases}  # one epoch warms up allocators, lazy imports and first calls
    for case in cases: time_run(runs[case])
    runs = {case: build(case) for case in cases}  # fresh models and optimizers for the timed runs
    best = {case: (math.inf, math.inf) for case in cases}
    order = cases[order_shift % len(cases):] + cases[:order_shift % len(cases)]
    for r in range(repeats):
        for case in (order if r % 2 == 0 else order[::-1]):
            wall, cpu = time_run(runs[case])
            best[case] = (min(best[case][0], wall), min(best[case][1], cpu))
    return best

def _peak_rss_kib():
    with open('/proc/self/status') as f:
        fields = dict(line.split(':', 1) for line in f)
    return int(fields['VmHWM'].split()[0]), int(fields['VmRSS'].split()[0])

def memory_worker(case):
    "Peak memory of the process during one fit of `case`, and its rise above the memory held before the fit (bytes)."
    time_run(build(case))  # warm-up: allocator pools, lazy imports
    run = build(case)
    if DEVICE != 'cpu':
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
        time_run(run)
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - before
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')  # reset VmHWM to the current resident set
    _, before = _peak_rss_kib()
    time_run(run)
    peak, _ = _peak_rss_kib()
    return peak * 1024, (peak - before) * 1024


def in_fresh_process(args, env_extra=None):
    out = subprocess.run([sys.executable, __file__, '--device', DEVICE] + (['--dry-run'] if DRY_RUN else []) + args,
                         capture_output=True, text=True,
                         env={**os.environ, **(env_extra or {})})
    if out.returncode != 0: raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- checkpoints

def _clone_tree(o):
    "What a hand-written background save must do first: a copy of every tensor of the state (containers rebuilt)."
    if isinstance(o, torch.Tensor): return o.detach().clone()
    if isinstance(o, dict): return {k: _clone_tree(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)): return type(o)(_clone_tree(v) for v in o)
    return o

def checkpoint_worker(repeats=7):
    """Seconds (median of `repeats`, interleaved) of: phaselearn's checkpoint save (sync: state, checksum, temporary file,
    fsync, rotation, rename); a hand save of the same state dict (torch.save to a temporary file, fsync, os.replace); the
    time an async_write save holds the loop (its write then runs in the background, waited for outside the timing);
    a hand copy of the state (every tensor cloned), the least a background save must do on the loop."""
    import tempfile
    from phaselearn.checkpoint import CheckpointCallback
    folder = Path(tempfile.mkdtemp(prefix='overhead_ckpt_'))
    set_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 512, generator=g), torch.randint(0, 10, (512,), generator=g)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))  # 1.05M params
    sync_cb, async_cb = CheckpointCallback('sync', every_epochs=1), CheckpointCallback('async', every_epochs=1, async_write=True)
    learn = Learner(DataLoaders.from_tensors(x, y, bs=128, seed=0, device=DEVICE), model, loss_func=F.cross_entropy,
                    path=folder, cbs=[sync_cb, async_cb], device=DEVICE)
    learn.progress_bar.show_bar = learn.progress_bar.show_table = False
    with discard_output(): learn.fit(1)
    state = sync_cb.state(1, 0, None)
    def hand_save():
        tmp, final = folder / '.hand.pt.tmp', folder / 'hand.pt'
        with open(tmp, 'wb') as f:
            torch.save(state, f); f.flush(); os.fsync(f.fileno())
        os.replace(tmp, final)
    def ours_async():
        start = time.perf_counter(); async_cb.save(1, 0, None); stall = time.perf_counter() - start
        async_cb.wait()
        return stall
    def timed(fn):
        start = time.perf_counter(); fn(); return time.perf_counter() - start
    times = {'sync_ours': [], 'sync_hand': [], 'async_stall': [], 'copy': []}
    ours_async(); hand_save(); sync_cb.save(1, 0, None); _clone_tree(state)  # warm-up: buffers, file-system caches
    for _ in range(repeats):
        times['sync_ours'].append(timed(lambda: sync_cb.save(1, 0, None)))
        times['sync_hand'].append(timed(hand_save))
        times['async_stall'].append(ours_async())
        times['copy'].append(timed(lambda: _clone_tree(state)))
    n_bytes = sum(t.numel() * t.element_size() for t in (v for d in (state['model'],) for v in d.values()))
    n_bytes += sum(v.numel() * v.element_size() for s in state['opt']['opt']['state'].values() for v in s.values()
                   if isinstance(v, torch.Tensor))
    import shutil; shutil.rmtree(folder, ignore_errors=True)
    return {k: statistics.median(v) for k, v in times.items()} | {'bytes': n_bytes}


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


# ---------------------------------------------------------------- the table

ROWS = [  # label, numerator case, denominator case, target (ratio <= target), what the target means
    ('hand loop + tqdm bar / hand loop', 'mlp/hand_tqdm', 'mlp/hand', None, 'what a bar costs by hand'),
    ('hand gather loop / hand loop', 'mlp/hand_gather', 'mlp/hand', None, 'no DataLoader: randperm + indexing'),
    ('phaselearn, progress off / hand loop', 'mlp/ours_quiet', 'mlp/hand', None, 'same torch DataLoader'),
    ('phaselearn, progress on / hand loop', 'mlp/ours', 'mlp/hand', 1.03, 'same DataLoader, default callbacks'),
    ('phaselearn, progress on / hand + tqdm', 'mlp/ours', 'mlp/hand_tqdm', None, 'display against display'),
    ('fast path, progress off / gather loop', 'mlp/fast_quiet', 'mlp/hand_gather', None, 'DataLoaders.from_tensors'),
    ('fast path, progress on / gather loop', 'mlp/fast', 'mlp/hand_gather', 1.03, 'from_tensors vs hand gathers'),
    ('CNN: phaselearn / hand loop', 'cnn/ours', 'cnn/hand', 1.02, 'compute-bound, same DataLoader'),
    ('CNN: fast path / gather loop', 'cnn/fast', 'cnn/hand_gather', 1.02, 'compute-bound, in memory'),
    ('16 layer groups: phaselearn / hand loop', 'groups16/ours', 'groups16/hand', 1.02, 'same torch param groups, lr slice'),
    ('bf16: phaselearn / hand loop', 'bf16/ours', 'bf16/hand', 1.01, 'to_bf16(); hand: one autocast per valid pass'),
]

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help="3 rounds instead of 5")
    parser.add_argument('--rounds', type=int, default=None, help='fresh processes, each timing every case')
    parser.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda': every side trains there")
    parser.add_argument('--syncs', action='store_true', help='also count the host reads phaselearn makes per batch')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory rows')
    parser.add_argument('--dry-run', action='store_true', help='one round, every case on 2 batches: checks that everything runs')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--memory-worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--checkpoint-worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--no-checkpoint', action='store_true', help='skip the checkpoint rows')
    parser.add_argument('--shift', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE, DRY_RUN
    DEVICE, DRY_RUN = args.device, args.dry_run
    if args.worker:
        print(json.dumps(worker(args.worker.split(','), args.shift, repeats=1 if DRY_RUN else 2))); return
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker))); return
    if args.checkpoint_worker:
        print(json.dumps(checkpoint_worker(repeats=2 if DRY_RUN else 7))); return
    rounds = 1 if DRY_RUN else args.rounds or (3 if args.quick else 5)
    cases = sorted({case for _, a, b, _, _ in ROWS for case in (a, b)})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if DEVICE != 'cpu' else ''}, {os.cpu_count()} cores; "
          f"{rounds} rounds of fresh processes, each case timed twice per round (best kept)", flush=True)
    results = []
    for r in range(rounds):
        results.append(in_fresh_process(['--worker', ','.join(cases), '--shift', str(r)]))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    sizes = {'mlp': (20_000, 5_000), 'cnn': (4_000, 1_000), 'groups16': (20_000, 5_000), 'bf16': (20_000, 5_000)}  # train, valid samples of mlp_data, cnn_data
    n_batches = {p: e * (math.ceil(sizes[p][0] / bs) + math.ceil(sizes[p][1] / (2 * bs))) for p, (_, _, bs, e) in PROBLEMS.items()}
    if DRY_RUN: n_batches = {p: 3 for p in PROBLEMS}
    print(f"\n{'ratio (median over rounds)':42s} {'wall':>6s} {'cpu':>6s} {'target':>7s}  {'':8s} us/batch  note")
    met_all = True
    for label, a, b, target, note in ROWS:
        wall = statistics.median(res[a][0] / res[b][0] for res in results)
        cpu = statistics.median(res[a][1] / res[b][1] for res in results)
        extra_us = statistics.median((res[a][0] - res[b][0]) for res in results) / n_batches[a.split('/')[0]] * 1e6
        verdict = '' if target is None else ('met' if wall <= target else 'NOT MET')
        met_all &= verdict != 'NOT MET'
        print(f"{label:42s} {wall:6.3f} {cpu:6.3f} {'<= %.2f' % target if target else '':>7s}  {verdict:8s} {extra_us:+8.1f}  {note}")
    for problem in PROBLEMS:
        if problem + '/hand' not in results[0]: continue
        print(f"  {problem}: hand loop {statistics.median(res[problem + '/hand'][0] for res in results):.3f}s wall per fit, "
              f"{n_batches[problem]} batches")
    if not args.no_memory and not DRY_RUN:
        unit = 'MiB, cuda max_memory_allocated' if DEVICE != 'cpu' else 'MiB, peak resident set'
        for ours, hand in (('mlp/ours', 'mlp/hand'), ('mlp/fast', 'mlp/hand_gather'), ('cnn/ours', 'cnn/hand')):
            peaks = {case: in_fresh_process(['--memory-worker', case]) for case in (hand, ours)}
            (peak_ours, rise_ours), (peak_hand, rise_hand) = peaks[ours], peaks[hand]
            ratio = peak_ours / peak_hand
            verdict = 'met' if ratio <= 1.02 else 'NOT MET'
            met_all &= verdict == 'met'
            print(f"peak memory {ours} / {hand}: {peak_ours / 2**20:.1f} / {peak_hand / 2**20:.1f} {unit} = {ratio:.3f} "
                  f"(target <= 1.02) {verdict};  rise during the fit {rise_ours / 2**20:.2f} / {rise_hand / 2**20:.2f} MiB")
    if not args.no_checkpoint:
        ckpt = [in_fresh_process(['--checkpoint-worker']) for _ in range(rounds)]
        med = {k: statistics.median(c[k] for c in ckpt) for k in ckpt[0]}
        for label, a, b, target, note in (
                ('checkpoint: phaselearn save / hand save', 'sync_ours', 'sync_hand', 1.10, 'sync; hand: torch.save+fsync+os.replace'),
                ('checkpoint: async_write stall / state copy', 'async_stall', 'copy', 1.00, 'time the loop waits vs cloning the state')):
            ratio = statistics.median(c[a] / c[b] for c in ckpt)
            verdict = 'met' if (ratio < target if a == 'async_stall' else ratio <= target) else 'NOT MET'
            met_all &= verdict == 'met'
            print(f"{label:42s} {ratio:6.3f} {'':6s} {('< ' if a == 'async_stall' else '<= ') + '%.2f' % target:>7s}  {verdict:8s} {(med[a] - med[b]) * 1e3:+7.2f}ms {note}")
        print(f"  checkpoint of {med['bytes'] / 2**20:.1f} MiB of tensors (1.05M-parameter MLP + Adam): phaselearn sync "
              f"{med['sync_ours'] * 1e3:.2f} ms, hand {med['sync_hand'] * 1e3:.2f} ms, async stall {med['async_stall'] * 1e3:.2f} ms, "
              f"state copy {med['copy'] * 1e3:.2f} ms (medians)")
    print(f"\nall targets {'met' if met_all else 'NOT all met'} in this run (noisy machines: rerun, compare the cpu column)")
    if args.syncs: sync_report(mlp_data(), 64, 3)
    print("per-batch costs by source: python bench/profile_batch.py")


if __name__ == '__main__': main()
