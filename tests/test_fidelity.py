"""Schedule fidelity: the values recorded at every training batch equal `learn.preview(phases)` exactly.

Two plans: `fit_one_cycle`'s, and three phases that change the optimizer, the batch size (one phase counted in
samples), the loss, and schedule attributes (a dropout probability, a label smoothing). Each runs (a) plainly,
(b) under FP16Training with one step skipped by an injected overflow, (c) under GradientAccumulation, (d) killed with
SIGKILL mid-phase and resumed from a checkpoint in a fresh process, (e) with a ReduceLROnPlateau that scales the lr,
(f) under DDP with 2 CPU processes launched by torchrun. "Equal" is `np.testing.assert_array_equal`: bit for bit.

This file is also the script the subprocess scenarios run: `python tests/test_fidelity.py kill|resume|ddp PLAN DIR`.
"""
import math, os, signal, subprocess, sys, tempfile
from pathlib import Path
import numpy as np
import pytest, torch
from torch import nn
from phaselearn.all import *
from phaselearn.tracking import ReduceLROnPlateau   # until phaselearn.all exports the tracking chapter (issue 10.1)

REPO = Path(__file__).resolve().parents[1]
PLAN_NAMES = ('one_cycle', 'three_phase')


def make_learner(cbs=(), path='.'):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    learn = Learner(digits_dls(bs=64, seed=0), model, loss_func=nn.CrossEntropyLoss(), metrics=[accuracy],
                    cbs=list(cbs), path=path)
    learn.progress_bar.show_bar = learn.progress_bar.show_table = False
    return learn


def make_plan(name: str) -> list:
    if name == 'one_cycle': return OneCycle(1e-2).phases(3)
    return [TrainingPhase(epochs=1, lr=SchedLin(1e-4, 1e-2), mom=SchedCos(0.95, 0.85), attrs={'model.2.p': SchedLin(0.5, 0.1)}),
            TrainingPhase(samples=1200, bs=128, opt_func=torch.optim.SGD, lr=SchedCos(1e-2, 1e-3), mom=0.9,
                          loss_func=nn.CrossEntropyLoss(label_smoothing=0.2),
                          attrs={'loss_func.label_smoothing': SchedLin(0.2, 0.)}),
            TrainingPhase(iters=15, bs=32, opt_func=torch.optim.AdamW, lr=SchedExp(1e-3, 1e-5), wd=0.05,
                          attrs={'model.2.p': 0.})]


def recorded(learn, preview) -> dict:
    return {name: learn.recorder.hyper(name) for name in preview}


def assert_follows(learn, preview):
    "Every previewed value equals the recorded one at every training batch, exactly."
    n_iter = sum(sum(p) for p in preview.lengths)
    assert len(learn.recorder.batch_sizes) == n_iter
    for name, expected in preview.items():
        got = learn.recorder.hyper(name)
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        np.testing.assert_array_equal(got, expected, err_msg=name)


def fit(learn, plan, cbs=(), resume=None):
    if plan == 'one_cycle': learn.fit_one_cycle(3, lr_max=1e-2, cbs=list(cbs), resume=resume)
    else: learn.fit_phases(make_plan(plan), cbs=list(cbs), resume=resume)


@pytest.mark.parametrize('plan', PLAN_NAMES)
def test_plain_fit_follows_preview(plan):
    learn = make_learner()
    preview = learn.preview(make_plan(plan))
    fit(learn, plan)
    assert_follows(learn, preview)
    if plan == 'three_phase':
        assert set(preview) >= {'lr', 'mom', 'wd', 'model.2.p', 'loss_func.label_smoothing'}
        assert learn.recorder.phase_samples == preview.samples   # 1438 samples, then 10 x 128, then 15 x 32
        assert preview.samples[1] == 1280 and preview.samples[2] == 480
        assert learn.model[2].p == 0.3 and learn.loss_func.label_smoothing == 0.   # borrowed attributes are back


class InjectOverflow(Callback):
    "Makes one gradient infinite after the backward pass of training batch `at` (counted over the fit)."
    order = 10
    def __init__(self, at: int): self.at = at
    def after_backward(self):
        if self.learn.train_iter == self.at:
            with torch.no_grad(): next(p for p in self.learn.model.parameters() if p.grad is not None).grad.fill_(math.inf)


@pytest.mark.parametrize('plan', PLAN_NAMES)
def test_fp16_skipped_step_does_not_shift_the_schedule(plan):
    learn = make_learner()
    fp16 = FP16Training(loss_scale=2. ** 8)
    learn.add_cb(fp16)
    preview = learn.preview(make_plan(plan))
    fit(learn, plan, cbs=[InjectOverflow(at=30)])
    assert fp16.skipped_steps == [30]    # the step of batch 30 was skipped...
    assert_follows(learn, preview)       # ...and batch 31 still used batch 31's values


class StepValues(Callback):
    "The lr the optimizer holds at each real step (after_step runs only when the step was not cancelled)."
    order = 100
    def before_fit(self): self.steps = []
    def after_step(self): self.steps.append((self.learn.train_iter, self.learn.opt.get_hyper('lr')[0]))


def step_groups(lengths, n_acc):
    "Per optimizer step, the fit's batch indices it is made of (a pass steps every n_acc batches and after its last)."
    groups, start = [], 0
    for passes in lengths:
        for n in passes:
            groups += [list(range(start + i, min(start + i + n_acc, start + n))) for i in range(0, n, n_acc)]
            start += n
    return groups


@pytest.mark.parametrize('plan', PLAN_NAMES)
def test_gradient_accumulation_moves_schedules_per_step(plan):
    learn = make_learner()
    accumulate = GradientAccumulation(n_acc=4)
    preview = learn.preview(make_plan(plan), cbs=[accumulate])
    log = StepValues()
    fit(learn, plan, cbs=[accumulate, log])
    assert_follows(learn, preview)
    groups = step_groups(preview.lengths, 4)
    assert [i for i, _ in log.steps] == [g[-1] for g in groups]         # a step after each group's last batch...
    assert [lr for _, lr in log.steps] == [float(preview['lr'][g[-1], 0]) for g in groups]
    for name, values in preview.items():                                # ...and every batch of a group has its step's values
        for g in groups: np.testing.assert_array_equal(values[g], np.repeat(values[g[:1]], len(g), 0), err_msg=name)
    k, n = 0, sum(len(step_groups([p], 4)) for p in preview.lengths[:1])   # phase 0: step k of n is at k / n
    first_phase = make_plan(plan)[0].hypers['lr']
    assert [lr for _, lr in log.steps[:n]] == [float(np.asarray(first_phase(k / n)).reshape(-1)[0]) for k in range(n)]


def acc_plan() -> list:
    "Lengths in optimizer steps and in samples, a ragged last batch (1438 = 22 x 64 + 30), attributes, two batch sizes."
    return [TrainingPhase(steps=5, lr=SchedLin(1e-4, 1e-2), attrs={'model.2.p': SchedLin(0.5, 0.1)}),
            TrainingPhase(samples=2 * 1438, lr=SchedCos(1e-2, 1e-3), mom=SchedLin(0.9, 0.95)),
            TrainingPhase(steps=7, bs=128, lr=SchedCosRestarts(1e-3, 1e-5, period=3, total=7), wd=SchedLin(0.01, 0.1))]


def test_samples_count_what_is_really_seen():
    "Two epochs of 1438 samples are 46 batches (not the nominal ceil(2876 / 64) = 45), and the preview says 2876."
    learn = make_learner()
    plan = [TrainingPhase(samples=2 * 1438, lr=SchedCos(1e-2, 1e-3), mom=SchedLin(0.9, 0.95)), TrainingPhase(samples=1500, lr=1e-3)]
    preview = learn.preview(plan)
    assert preview.lengths == [[23, 23], [23, 1]] and preview.samples == [2876, 1438 + 64]
    learn.fit_phases(plan)
    assert_follows(learn, preview)
    assert learn.recorder.phase_samples == preview.samples


def test_steps_and_samples_under_accumulation_follow_preview():
    learn = make_learner()
    accumulate = GradientAccumulation(n_acc=4)
    learn.add_cb(accumulate)
    preview = learn.preview(acc_plan())
    # 23 batches a pass are 6 steps (5 x 4 + 3); at bs 128, 12 batches are 3 steps: 7 steps are 2 passes and 4 batches
    assert preview.lengths == [[20], [23, 23], [12, 12, 4]]
    assert preview.samples == [20 * 64, 2876, 2 * 1438 + 4 * 128]
    log = StepValues()
    learn.fit_phases(acc_plan(), cbs=[log])
    assert_follows(learn, preview)
    assert learn.recorder.phase_samples == preview.samples
    groups = step_groups(preview.lengths, 4)
    assert len(log.steps) == len(groups) == 5 + 12 + 7
    restarts = SchedCosRestarts(1e-3, 1e-5, period=3, total=7)
    assert [lr for _, lr in log.steps[-7:]] == [restarts(k / 7) for k in range(7)]


class Interrupt(Callback):
    order = 100
    def __init__(self, at: int): self.at = at
    def after_batch(self):
        if self.learn.training and self.learn.train_iter == self.at: raise RuntimeError('interrupted')


def test_resume_mid_step_under_accumulation_follows_preview(tmp_path):
    "Checkpoints every 5 batches fall inside groups of 4; a fit stopped at batch 57 resumes from 55 in a fresh learner."
    reference = make_learner(cbs=[GradientAccumulation(n_acc=4)])
    preview = reference.preview(acc_plan())
    reference.fit_phases(acc_plan())
    checkpoint = lambda: CheckpointCallback(every_iters=5, every_epochs=None)
    learn = make_learner(cbs=[GradientAccumulation(n_acc=4)], path=tmp_path)
    with pytest.raises(RuntimeError, match='interrupted'): learn.fit_phases(acc_plan(), cbs=[checkpoint(), Interrupt(57)])
    assert read_checkpoint(learn, 'checkpoint')['train_iter'] == 55
    resumed = make_learner(cbs=[GradientAccumulation(n_acc=4)], path=tmp_path)
    resumed.fit_phases(acc_plan(), cbs=[checkpoint()], resume='checkpoint')
    assert_follows(resumed, preview)
    for p, q in zip(resumed.model.parameters(), reference.model.parameters()): assert torch.equal(p, q)


def test_nanogpt_recipe_with_gradient_accumulation():
    "nanoGPT's warm-up and cosine to a floor (train.py's get_lr, iterations 0..max_iters), as phases of built-ins."
    learning_rate, min_lr, warmup_iters, lr_decay_iters, max_iters = 6e-4, 6e-5, 8, 30, 34
    def get_lr(it):   # as nanoGPT's train.py has it
        # 1) linear warmup for warmup_iters steps
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        # 2) if it > lr_decay_iters, return min learning rate
        if it > lr_decay_iters:
            return min_lr
        # 3) in between, use cosine decay down to min learning rate
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        assert 0 <= decay_ratio <= 1
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) # coeff ranges 0..1
        return min_lr + coeff * (learning_rate - min_lr)
    # nanoGPT counts the warm-up from 1 ((it + 1) / (warmup + 1)): a line from lr / (W + 1) that would reach lr at step W
    plan = [TrainingPhase(steps=warmup_iters, lr=SchedLin(learning_rate / (warmup_iters + 1), learning_rate)),
            TrainingPhase(steps=lr_decay_iters - warmup_iters, lr=SchedCos(learning_rate, min_lr)),
            TrainingPhase(steps=max_iters - lr_decay_iters + 1, lr=min_lr)]
    learn = make_learner(cbs=[GradientAccumulation(n_acc=4)])
    log = StepValues()
    learn.fit_phases(plan, cbs=[log])
    expected = np.array([get_lr(it) for it in range(max_iters + 1)])
    got = np.array([lr for _, lr in log.steps])
    assert len(got) == max_iters + 1 == len(step_groups(learn.preview(plan).lengths, 4))
    # the same numbers step for step; nanoGPT writes lr * (it + 1) / (W + 1) and min + coeff * (lr - min) where the built-ins
    # compute start + pct * (end - start) and a cosine kept exact at both ends: the roundings differ by at most 4 ulp (1e-15)
    np.testing.assert_array_max_ulp(got, expected, maxulp=4)
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    recorded = learn.recorder.hyper('lr')[:, 0]
    for g, lr in zip(step_groups(learn.preview(plan).lengths, 4), got): assert (recorded[g] == lr).all()   # every micro-batch


@pytest.mark.parametrize('plan', PLAN_NAMES)
def test_reduce_lr_on_plateau_scales_the_preview(plan):
    learn = make_learner()
    preview = learn.preview(make_plan(plan))
    plateau = ReduceLROnPlateau(patience=1, factor=0.5, min_delta=10.)   # never "improves" after epoch 0: lr x 0.5 each epoch
    fit(learn, plan, cbs=[plateau])
    scale = learn.recorder.hyper('lr_scale')
    assert scale.shape == preview['lr'].shape and scale.min() < 1 and scale.max() == 1
    np.testing.assert_array_equal(learn.recorder.hyper('lr'), preview['lr'] * scale)
    for name in preview:
        if name != 'lr': np.testing.assert_array_equal(learn.recorder.hyper(name), preview[name], err_msg=name)
    first = int(np.argmax(scale[:, 0] < 1))     # reduced after epoch 1 (the first without improvement), from epoch 2 on
    assert first == sum(learn.recorder.epoch_batches[:2])


class ReadProgress(Callback):
    "Reads `learn.progress` around every batch, as a loss or a module would."
    def before_fit(self): self.seen = []
    def before_batch(self):
        progress = self.learn.progress
        if self.training: self.seen.append(progress)
    def after_batch(self): self.learn.progress


def test_attributes_and_progress_cost_no_host_sync():
    "Scheduling attributes and reading learn.progress at every batch add no host read of a tensor to the fit."
    from syncs import SyncCounter
    def reads(plan, cbs):
        learn = make_learner()
        with SyncCounter() as counter: learn.fit_phases(plan, cbs=cbs)
        return sum(counter.calls.values())
    plain = [TrainingPhase(epochs=1, lr=SchedCos(1e-3, 1e-2)), TrainingPhase(iters=10, bs=128, lr=1e-3)]
    scheduled = [TrainingPhase(epochs=1, lr=SchedCos(1e-3, 1e-2), attrs={'model.2.p': SchedLin(0.5, 0.1)}),
                 TrainingPhase(iters=10, bs=128, lr=1e-3, attrs={'loss_func.label_smoothing': SchedLin(0.1, 0.)})]
    reader = ReadProgress()
    assert reads(scheduled, [reader]) == reads(plain, [])
    assert [p.phase for p in reader.seen] == [0] * 23 + [1] * 10
    assert [p.phase_iter for p in reader.seen] == list(range(23)) + list(range(10))
    assert [p.phase_pct for p in reader.seen] == [i / 23 for i in range(23)] + [i / 10 for i in range(10)]
    assert [p.samples for p in reader.seen[24:]] == [1438 + 128 * i for i in range(1, 10)]


class KillAt(Callback):
    order = 100
    def __init__(self, at: int): self.at = at
    def after_batch(self):
        if self.learn.training and self.learn.train_iter == self.at: os.kill(os.getpid(), signal.SIGKILL)


def _script(*args, torchrun=False) -> subprocess.Popen:
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'CUDA_VISIBLE_DEVICES': '', 'GLOO_SOCKET_IFNAME': 'lo', 'OMP_NUM_THREADS': '1'}
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'] if torchrun else [sys.executable]
    return subprocess.Popen(launcher + [__file__, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)

def _finish(process, timeout=180):
    try: out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill(); out, err = process.communicate()
    return process.returncode, out + err


KILL_AT, EVERY = {'one_cycle': 37, 'three_phase': 31}, 4   # three_phase: batch 31 is in the middle of phase 1 (23..32)


@pytest.fixture(scope='module')
def resumed_runs():
    "For each plan, a process killed by SIGKILL at batch KILL_AT, then a fresh one that resumes (the plans side by side)."
    with tempfile.TemporaryDirectory() as d:
        dirs = {plan: Path(d) / plan for plan in PLAN_NAMES}
        killed = {plan: _script('kill', plan, dirs[plan]) for plan in PLAN_NAMES}
        killed = {plan: _finish(p) for plan, p in killed.items()}
        resumed = {plan: _script('resume', plan, dirs[plan]) for plan in PLAN_NAMES}
        resumed = {plan: _finish(p) for plan, p in resumed.items()}
        results = {plan: torch.load(dirs[plan] / 'resumed.pt', weights_only=False) if (dirs[plan] / 'resumed.pt').exists() else None
                   for plan in PLAN_NAMES}
    return killed, resumed, results


@pytest.mark.parametrize('plan', PLAN_NAMES)
def test_kill_and_resume_in_a_fresh_process_follows_preview(plan, resumed_runs):
    killed, resumed, results = resumed_runs
    assert killed[plan][0] == -signal.SIGKILL, killed[plan][1][-3000:]
    assert resumed[plan][0] == 0, resumed[plan][1][-3000:]
    result = results[plan]
    learn = make_learner()
    preview = learn.preview(make_plan(plan))
    fit(learn, plan)
    assert result['start'] == (KILL_AT[plan] // EVERY) * EVERY      # resumed mid-phase, from the last checkpoint
    for name in preview:
        np.testing.assert_array_equal(result['recorded'][name], preview[name], err_msg=name)
        np.testing.assert_array_equal(result['recorded'][name], learn.recorder.hyper(name), err_msg=name)
    assert result['samples'] == learn.recorder.phase_samples and result['progress_samples'] == learn.progress.samples
    if plan == 'three_phase': assert result['restored'] == (0.3, 0.)   # attributes back to their pre-fit values


def test_ddp_ranks_follow_the_same_preview():
    with tempfile.TemporaryDirectory() as d:
        code, output = _finish(_script('ddp', 'three_phase', d, torchrun=True))
        assert code == 0, output[-4000:]
        ranks = [torch.load(Path(d) / f'rank{r}.pt', weights_only=False) for r in range(2)]
    for rank in ranks:
        assert rank['world_size'] == 2
        for name, expected in rank['preview'].items():
            np.testing.assert_array_equal(rank['recorded'][name], expected, err_msg=name)
            np.testing.assert_array_equal(rank['recorded'][name], ranks[0]['recorded'][name], err_msg=name)
    assert ranks[0]['weights'] == ranks[1]['weights']


def _main(mode: str, plan: str, directory: str):
    torch.set_num_threads(1)
    if mode in ('kill', 'resume'):
        checkpoint = CheckpointCallback(every_iters=EVERY, every_epochs=None)
        learn = make_learner(path=directory)
        if mode == 'kill': fit(learn, plan, cbs=[checkpoint, KillAt(KILL_AT[plan])])
        start = read_checkpoint(learn, 'checkpoint')['train_iter']
        fit(learn, plan, cbs=[checkpoint], resume='checkpoint')
        preview = learn.preview(make_plan(plan))
        torch.save({'recorded': recorded(learn, preview), 'start': start, 'samples': learn.recorder.phase_samples,
                    'progress_samples': learn.progress.samples, 'restored': (learn.model[2].p, learn.loss_func.label_smoothing)},
                   Path(directory) / 'resumed.pt')
        return
    setup_distributed('gloo')
    try:
        rank, world_size = rank_and_world_size()
        learn = make_learner(cbs=[DistributedCallback()], path=directory)
        preview = learn.preview(make_plan(plan))
        fit(learn, plan)
        weights = sum(p.detach().double().sum().item() for p in learn.model.parameters())
        torch.save({'world_size': world_size, 'preview': dict(preview), 'recorded': recorded(learn, preview), 'weights': weights},
                   Path(directory) / f'rank{rank}.pt')
    finally: teardown_distributed()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)   # as bench/ddp_digits.py: no interpreter clean-up after the group is gone


if __name__ == '__main__': _main(*sys.argv[1:4])
