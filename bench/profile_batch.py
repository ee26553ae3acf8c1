#!/usr/bin/env python
"""Where phaselearn's per-batch host time goes: microseconds per training batch, by source, next to what the
hand-written loop of bench/overhead.py spends on the same job.

Each row times one piece on a learner in the middle of a `fit_one_cycle` (MLP 20->32->2, bs 64, Adam, CPU), called as
often per training batch as the loop calls it (minimum of 5 repeats of a few thousand calls: the quiet-machine cost).
The 'total overhead' row adds the phaselearn column and subtracts the hand column; the last rows time whole batches.

    OMP_NUM_THREADS=1 python bench/profile_batch.py
"""
import sys, timeit, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from overhead import (mlp, mlp_data, make_learner, phaselearn_fit, discard_output, HandGather, LR_MAX, DIV, DIV_FINAL,
                      PCT_START, MOMS)
from phaselearn.all import *
from phaselearn.core import to_device


def per_call_us(fn, number=3000, repeat=5):
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def cycling(make_iter):
    "A zero-argument function returning the next batch of a loader, starting a new pass when one ends."
    state = {'it': make_iter()}
    def next_batch():
        try: return next(state['it'])
        except StopIteration: state['it'] = make_iter(); return next(state['it'])
    return next_batch


def profile(bs=64):
    x, y, xv, yv = mlp_data()
    set_seed(0)
    learn = make_learner(mlp(), DataLoaders.from_tensors(x, y, xv, yv, bs=bs, seed=0, device='cpu'))
    with discard_output(): phaselearn_fit(learn, 1)
    n_train = len(learn.dls.train)
    # a learner as in the middle of a fit_one_cycle: its scheduler, recorder and an open progress bar
    phases = Phases(OneCycle(LR_MAX, DIV, DIV_FINAL, PCT_START, MOMS).phases(3))
    scheduler = PhaseScheduler(phases, phases.lengths(n_train))
    learn.add_cb(scheduler)
    learn.model.train(); learn.training, learn.epoch, learn.iter, learn.n_iter = True, 0, 0, n_train
    learn.train_iter, learn.total_iter = 0, 10 ** 9
    xb, yb = x[:bs], y[:bs]
    learn.xb, learn.yb = (xb,), (yb,)
    learn.pred = learn.model(xb); learn.loss_grad = learn.compute_loss(); learn.loss = learn.loss_grad.detach()
    for cb in learn.cbs:
        if hasattr(type(cb), 'before_fit'): cb.before_fit()
    scheduler.before_epoch()
    rows = []
    def row(source, ours, hand, what): rows.append((source, ours, hand, what))

    # dispatch: 8 events per training batch and the two context hooks, with nothing listening
    n_events = sum(1 for e in ('before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward',
                               'before_step', 'after_step', 'after_batch'))
    empty = {event: [] for event in learn._handlers}
    saved, learn._handlers = learn._handlers, empty
    dispatch = per_call_us(lambda: learn('after_pred')) * n_events
    def contexts():
        with learn._contexts('batch_context'):
            with learn._contexts('forward_context'): pass
    dispatch += per_call_us(contexts)
    batch = (xb, yb)
    def unpack():  # what _do_batch does besides dispatching
        b = batch if isinstance(batch, (tuple, list)) else (batch,)
        return tuple(b[:1]), tuple(b[1:])
    dispatch += per_call_us(unpack)
    learn._handlers = saved
    row('dispatch', dispatch, 0., f'{n_events} events + 2 context hooks + batch unpacking, no handler')

    # hyper setting: the scheduler's before_batch against OneCycleLR.step
    learn.iter = 5
    hand_opt = torch.optim.Adam(learn.model.parameters(), lr=1e-3, betas=(MOMS[0], 0.999))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        one_cycle = torch.optim.lr_scheduler.OneCycleLR(hand_opt, max_lr=LR_MAX, total_steps=10 ** 8)
        hand_sched = per_call_us(one_cycle.step)
    row('hyper setting', per_call_us(scheduler.before_batch), hand_sched, 'PhaseScheduler.before_batch (lr, mom) vs OneCycleLR.step')

    # the same with 16 layer groups and a discriminative lr (a slice spread over the groups), per group
    from overhead import deep
    deep_model = deep()
    deep_opt = OptimWrapper(deep_model, torch.optim.Adam, splitter=sequential_splitter, lr=1e-3, true_wd=True, bias_wd=True)
    lr_sched = OneCycle(slice(LR_MAX / 100, LR_MAX), DIV, DIV_FINAL, PCT_START, MOMS).phases(1)[0].hypers
    def ours_groups():
        for name, schedule in lr_sched.items():
            if callable(schedule): deep_opt.set_hyper(name, schedule(0.3))
    groups = [{'params': list(c.parameters())} for c in deep_model.children() if list(c.parameters())]
    hand16 = torch.optim.Adam(groups, lr=1e-3, betas=(MOMS[0], 0.999))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        one_cycle16 = torch.optim.lr_scheduler.OneCycleLR(hand16, max_lr=spread_values(slice(LR_MAX / 100, LR_MAX), 16), total_steps=10 ** 8)
        hand_sched16 = per_call_us(one_cycle16.step)
    row('hyper setting, 16 groups', per_call_us(ours_groups), hand_sched16,
        f'the one-cycle schedules of lr=slice(..) and mom set on 16 layer groups vs OneCycleLR.step ({len(deep_opt.param_groups)} torch groups)')
    deep_opt.opt.step, deep_opt.opt.zero_grad = (lambda closure=None: None), (lambda set_to_none=True: None)
    row('optimizer wrapper, 16 groups', per_call_us(deep_opt.step) + per_call_us(deep_opt.zero_grad), 0.,
        'OptimWrapper.step + zero_grad around a no-op torch optimizer, 16 torch groups (wd=0)')

    # recorder (train batch) and train/eval counter against the hand loop's device-side loss sum
    recorder = learn.recorder
    total = torch.zeros(())
    def hand_accumulate():
        nonlocal total
        total += learn.loss * len(yb)
    row('recorder', per_call_us(recorder.after_batch, number=20000), per_call_us(hand_accumulate),
        'Recorder.after_batch (loss kept, hypers snapshot) vs train_total += loss*len(yb)')
    recorder.before_fit()
    row('train counter', per_call_us(learn.train_eval.after_batch), 0., 'TrainEvalCallback.after_batch')

    # the loss: Learner.compute_loss (shape checks, loss-hook lookup, nn.CrossEntropyLoss module) vs F.cross_entropy
    row('loss call', per_call_us(learn.compute_loss), per_call_us(lambda: F.cross_entropy(learn.pred, yb)),
        'Learner.compute_loss with nn.CrossEntropyLoss() vs F.cross_entropy')
    # per fit, spread over its training batches: the plan check (every scheduled value of the fit computed up front)
    from phaselearn.phases import _check_plan, _phase_lengths
    lengths = _phase_lengths(learn, phases)
    plan_us = per_call_us(lambda: _check_plan(learn, phases, lengths), number=3) / sum(map(sum, lengths))
    row('plan check (per fit)', plan_us, 0., 'fit_phases\' _check_plan (a preview of every value), per training batch')

    # progress: the bar's per-batch call against tqdm's own per-batch update
    progress = learn.progress_bar
    from tqdm.auto import tqdm
    with discard_output():
        progress.before_train(); ours = per_call_us(progress.after_batch, number=20000); progress._close_bar()
        bar = tqdm(total=10 ** 9, leave=False); hand = per_call_us(lambda: bar.update(1), number=20000); bar.close()
    row('progress', ours, hand, 'ProgressCallback.after_batch vs tqdm.update(1) (both draw at most ~10x a second)')

    # batch fetch: the fast path against the hand gather loop, and torch's DataLoader for scale
    tl = learn.dls.train
    ours = per_call_us(cycling(lambda: iter(tl)), number=n_train * 3)
    hand = per_call_us(cycling(lambda: iter(HandGather(x, y, bs, True))), number=n_train * 3)
    row('batch fetch (fast path)', ours, hand, 'TensorLoader batch vs hand randperm + x[idx], y[idx]')
    dl = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)
    torch_dl = per_call_us(cycling(lambda: iter(dl)), number=n_train)
    row('batch fetch (DataLoader)', torch_dl + per_call_us(lambda: to_device(batch, learn.device)), torch_dl + per_call_us(lambda: (xb.to('cpu', non_blocking=True), yb.to('cpu', non_blocking=True))),
        'torch DataLoader batch + to_device vs the same + two .to(device)')

    # optimizer: decay, step and zero_grad against torch's Adam on the same parameters
    F.cross_entropy(learn.model(xb), yb).backward()
    opt = learn.opt
    hand_opt = torch.optim.Adam(learn.model.parameters(), lr=1e-3, betas=(MOMS[0], 0.999))
    row('decay (wd=0)', per_call_us(opt._decoupled_decay), 0., 'OptimWrapper._decoupled_decay, nothing to do')
    opt.set_hyper('wd', 1e-2)
    hand_w = torch.optim.AdamW(learn.model.parameters(), lr=1e-3, weight_decay=1e-2)
    row('decay (wd=0.01)', per_call_us(opt._decoupled_decay, number=1000), 0., 'one _foreach_mul_ per layer group (AdamW does the same inside its step)')
    opt.set_hyper('wd', 0.)
    # the wrapper's own cost around torch's step and zero_grad (the torch work itself is the same on both sides)
    opt.opt.step, opt.opt.zero_grad = (lambda closure=None: None), (lambda set_to_none=True: None)
    row('optimizer wrapper', per_call_us(opt.step) + per_call_us(opt.zero_grad), 0.,
        f'OptimWrapper.step + zero_grad around a no-op torch optimizer ({len(opt.param_groups)} torch group(s))')
    del opt.opt.step, opt.opt.zero_grad
    row('(torch Adam.step, for scale)', per_call_us(opt.opt.step, number=1000), per_call_us(hand_opt.step, number=1000),
        'the same work on both sides: any difference is noise')

    # whole batches
    learn.train_iter = 0
    def ours_batch():
        learn.iter = 5; learn._do_batch(batch)
    def hand_batch():
        loss = F.cross_entropy(learn.model(xb), yb); loss.backward(); hand_opt.step(); one_cycle.step(); hand_opt.zero_grad()
        hand_accumulate()
    with warnings.catch_warnings(), discard_output():
        warnings.simplefilter('ignore')
        progress.before_train()
        whole_ours, whole_hand = per_call_us(ours_batch, number=1000), per_call_us(hand_batch, number=1000)
        progress._close_bar()

    print(f"per training batch, us of host time (MLP 20->32->2, bs {bs}, Adam, one-cycle, {torch.get_num_threads()} thread(s)):")
    print(f"  {'source':26s} {'phaselearn':>10s} {'hand loop':>10s} {'extra':>8s}  what is timed")
    for source, ours, hand, what in rows:
        print(f"  {source:26s} {ours:10.2f} {hand:10.2f} {ours - hand:+8.2f}  {what}")
    extra = sum(o - h for s, o, h, _ in rows if not s.startswith(('batch fetch (DataLoader)', 'decay (wd=0.01)', '(')) and '16 groups' not in s)
    print(f"  {'total overhead':26s} {'':10s} {'':10s} {extra:+8.2f}  sum of the rows but the DataLoader, wd=0.01, 16-group and (for scale) ones")
    print(f"  {'whole batch, data excluded':26s} {whole_ours:10.2f} {whole_hand:10.2f} {whole_ours - whole_hand:+8.2f}  "
          f"Learner._do_batch vs forward, backward, Adam, OneCycleLR, zero_grad, loss sum")


if __name__ == '__main__': profile()
