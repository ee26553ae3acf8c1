"Phases and policies against torch's own lr schedulers, and fits that follow their previews exactly."
import numpy as np, pytest, torch
from torch import nn
from phaselearn.all import *


def torch_schedule(make_scheduler, n, key='lr', optimizer=torch.optim.SGD, **opt_kwargs):
    "The value of `key` that torch's scheduler gives at each of `n` steps."
    opt = optimizer([nn.Parameter(torch.zeros(1))], lr=1.0, **opt_kwargs)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        group = opt.param_groups[0]
        out.append(group['betas'][0] if key == 'betas0' else group[key])
        opt.step(); sched.step()
    return np.array(out)


@pytest.mark.parametrize('n,pct_start', [(100, 0.25), (57, 0.3), (1000, 0.1)])
def test_one_cycle_matches_torch_one_cycle_lr(n, pct_start):
    """OneCycle over n iterations against torch's OneCycleLR.

    Convention difference: phaselearn's iteration i uses pct = i/n, so the warm-up of s = pct_start*n iterations
    reaches lr_max at iteration s (the first iteration of the annealing part); torch's OneCycleLR peaks at step
    pct_start*total_steps - 1 and reaches its minimum at the last step. The two coincide when torch is given
    total_steps = n + 1 and pct_start = (s + 1)/(n + 1): then torch's step k equals our iteration k for k < n.
    Its final_div_factor is our div_final/div (it divides the initial lr, lr_max/div)."""
    lr_max, div, div_final = 1e-2, 25., 1e5
    s = pct_start * n
    values = Phases(OneCycle(lr_max, div, div_final, pct_start).phases(1)).preview(n)
    make = lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr_max, total_steps=n + 1, pct_start=(s + 1) / (n + 1), div_factor=div,
        final_div_factor=div_final / div, anneal_strategy='cos', cycle_momentum=True,
        base_momentum=0.85, max_momentum=0.95, three_phase=False)
    np.testing.assert_allclose(values['lr'][:, 0], torch_schedule(make, n), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(values['mom'][:, 0], torch_schedule(make, n, 'momentum', momentum=0.9), rtol=1e-9)


@pytest.mark.parametrize('n', [10, 64, 333])
def test_cosine_phase_matches_cosine_annealing_lr(n):
    "A cosine phase from 0.1 to 1e-4 over n iterations is CosineAnnealingLR(T_max=n, eta_min=1e-4), step by step."
    values = Phases([TrainingPhase(iters=n, lr=SchedCos(0.1, 1e-4))]).preview(1000)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n, eta_min=1e-4)
    expected = []
    for _ in range(n):
        expected.append(opt.param_groups[0]['lr']); opt.step(); sched.step()
    np.testing.assert_allclose(values['lr'][:, 0], expected, rtol=1e-9)


def make_learner(**kwargs):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    return Learner(digits_dls(bs=64, seed=0), model, loss_func=nn.CrossEntropyLoss(), metrics=[accuracy],
                   cbs=[], default_cbs=True, **kwargs)


class StepLog(Callback):
    "Every layer group's hyperparameters, read just before each optimizer step."
    order = 100
    def __init__(self, names): self.names, self.log = names, {n: [] for n in names}
    def before_step(self):
        for n in self.names: self.log[n].append(self.opt.get_hyper(n))


def test_fit_follows_preview_across_bs_and_optimizer_changes():
    learn = make_learner(splitter=body_head_splitter)
    learn.progress.show_bar = learn.progress.show_table = False
    phases = [TrainingPhase(epochs=0.3, lr=SchedExp(slice(1e-5, 1e-4), slice(1e-3, 1e-2)), mom=0.9, wd=0.),
              TrainingPhase(epochs=1.5, bs=32, lr=SchedCos(1e-2, 1e-3), mom=SchedLin(0.85, 0.95), wd=1e-2),
              TrainingPhase(iters=17, bs=128, opt_func=torch.optim.SGD, lr=SchedPoly(1e-2, 0., 2), mom=0.9),
              TrainingPhase(epochs=0.5, opt_func=torch.optim.RMSprop, lr=1e-4, sqr_mom=SchedLin(0.9, 0.99))]
    expected = learn.preview(phases)
    log = StepLog(['lr', 'mom', 'wd'])
    learn.fit_phases(phases, cbs=[log])
    for name in ('lr', 'mom', 'wd'):
        np.testing.assert_array_equal(np.array(log.log[name]), expected[name])
    assert expected['lr'].shape[1] == 2
    n64, n32, n128 = (len(learn.dls.new(bs=b).train) for b in (64, 32, 128))
    assert len(log.log['lr']) == round(0.3 * n64) + round(1.5 * n32) + 17 + round(0.5 * n64)
    assert isinstance(learn.opt.opt, torch.optim.RMSprop)
    assert learn.dls.train.bs == 64 and isinstance(learn.loss_func, nn.CrossEntropyLoss)


def test_schedule_ignores_skipped_steps():
    "Skipped optimizer steps (CancelStepException) do not shift the schedule: it follows position."
    class SkipOdd(Callback):
        order = 200
        def before_step(self):
            if self.iter % 2: raise CancelStepException()
    learn = make_learner()
    phases = [TrainingPhase(epochs=1, lr=SchedLin(1e-3, 1e-2))]
    expected = learn.preview(phases)
    seen = []
    class Watch(Callback):
        order = 150
        def before_step(self): seen.append(self.opt.get_hyper('lr')[0])
    learn.fit_phases(phases, cbs=[Watch(), SkipOdd()])
    np.testing.assert_array_equal(seen, expected['lr'][:, 0])


def test_bad_plans_fail_before_training():
    learn = make_learner(opt_func=torch.optim.SGD)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match='sqr_mom'): learn.fit_phases([TrainingPhase(epochs=1, sqr_mom=0.9)])
    with pytest.raises(ValueError, match='negative'): learn.fit_phases([TrainingPhase(epochs=1, lr=SchedLin(1e-2, -1e-3))])
    with pytest.raises(ValueError, match='NaN'): learn.fit_phases([TrainingPhase(iters=3, mom=lambda p: float('nan'))])
    with pytest.raises(ValueError, match='exactly one'): TrainingPhase(epochs=1, iters=2)
    with pytest.raises(ValueError): SchedLin(0, 1)(1.5)
    for b, p in zip(before, learn.model.parameters()): assert torch.equal(b, p.detach())


def test_policies_shortcuts_train_digits():
    for fit in ('fit_one_cycle', 'fit_flat_cos', 'fit_warmup_cosine'):
        learn = make_learner()
        learn.progress.show_bar = learn.progress.show_table = False
        getattr(learn, fit)(3, 1e-2)
        assert len(learn.recorder.values) == 3
        assert learn.validate()[1] > 0.9, fit
    learn = make_learner()
    learn.fit_sgdr(2, cycle_len=1, lr_max=1e-2)
    assert len(learn.recorder.values) == 1 + 2
