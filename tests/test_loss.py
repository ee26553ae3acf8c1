"""ScheduledLoss and SwitchLoss: values against hand computations, in a Learner (components recorded, weights per
batch, phase overrides, switches), nesting, checkpoints, lr_find, and host syncs."""
import contextlib, copy, io, math, pickle
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from phaselearn.all import *
from test_syncs import SyncCounter


def penalty(pred, target): return pred.pow(2).mean()


def learner(loss_func, cbs=()):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return Learner(digits_dls(bs=64, seed=0), model, loss_func=loss_func, lr=1e-2, cbs=[Recorder(), *cbs],
                   default_cbs=False)


class Recompute(Callback):
    "Per training batch: pct, and each part recomputed from the batch's prediction and target."
    order = 100
    def __init__(self, parts): self.parts = parts
    def before_fit(self): self.pcts, self.values, self.losses = [], [], []
    def after_loss(self):
        if not self.training: return
        with torch.no_grad(): self.values.append([f(self.pred, *self.yb).item() for f in self.parts])
        self.pcts.append(self.pct_train); self.losses.append(self.loss.item())


@pytest.mark.parametrize('seed', range(5))
def test_value_is_the_weighted_sum(seed):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(16, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
    a, b = (torch.rand(2, generator=g) * 4 - 2).tolist()   # negative weights too
    loss = ScheduledLoss([F.cross_entropy, penalty, F.multi_margin_loss], [a, SchedCos(b, -b), SchedExp(0.1, 1.)])
    for pct in torch.rand(5, generator=g).tolist() + [0., 1.]:
        loss.pct = pct
        weights = [a, b + (-b - b) * (1 - math.cos(math.pi * pct)) / 2, 0.1 * (1. / 0.1) ** pct]
        parts = [F.cross_entropy(pred, target), penalty(pred, target), F.multi_margin_loss(pred, target)]
        torch.testing.assert_close(loss(pred, target), sum(w * p for w, p in zip(weights, parts)))


def test_learner_records_components_and_weights():
    parts = [nn.CrossEntropyLoss(), penalty]
    loss = ScheduledLoss(parts, [SchedLin(1., 0.), SchedLin(0., 0.05)])
    learn = learner(loss, cbs=[Recompute(parts)])
    learn.fit(3)
    log, n = learn.recompute, 3 * len(learn.dls.train)
    values, pcts = np.array(log.values), np.array(log.pcts)
    np.testing.assert_allclose(pcts, np.arange(n) / n)
    components = learn.recorder.loss_components
    np.testing.assert_allclose(components['cross_entropy_loss'], values[:, 0], rtol=1e-6)
    np.testing.assert_allclose(components['penalty'], values[:, 1], rtol=1e-6)
    np.testing.assert_allclose((1 - pcts) * values[:, 0] + 0.05 * pcts * values[:, 1], log.losses, rtol=1e-5)
    per_epoch = len(learn.dls.train)
    sizes = np.array([64] * (per_epoch - 1) + [len(learn.dls.train.tensors[0]) - 64 * (per_epoch - 1)])
    epochs = learn.recorder.epoch_loss_components['penalty']
    expected = [(values[e * per_epoch:(e + 1) * per_epoch, 1] * sizes).sum() / sizes.sum() for e in range(3)]
    np.testing.assert_allclose(epochs, expected, rtol=1e-6)


def test_phase_override_then_own_weights_then_next_fit():
    loss = ScheduledLoss([nn.CrossEntropyLoss(), penalty], [1., SchedLin(0., 1.)])
    class WeightLog(Callback):
        order = 100
        def before_fit(self): self.train, self.valid = [], []
        def after_loss(self): (self.train if self.training else self.valid).append(list(self.learn.loss_func.last_weights))
    learn = learner(loss, cbs=[WeightLog()])
    n = len(learn.dls.train)
    learn.fit_phases([TrainingPhase(epochs=1, loss_weights=[0.5, SchedLin(2., 4.)]), TrainingPhase(iters=4)])
    train = np.array(learn.weight_log.train)
    np.testing.assert_allclose(train[:n], np.stack([np.full(n, 0.5), 2 + 2 * np.arange(n) / n], 1))
    np.testing.assert_allclose(train[n:, 1], (n + np.arange(4)) / (n + 4))    # own schedule over the whole fit
    np.testing.assert_allclose(learn.weight_log.valid[0], [0.5, 2 + 2 * (n - 1) / n])  # validation keeps the phase's last
    learn.fit(1)
    np.testing.assert_allclose(np.array(learn.weight_log.train)[:, 1], np.arange(n) / n)


def test_switch_loss_in_phases_and_by_pct():
    loss = SwitchLoss([nn.CrossEntropyLoss(), (nn.MultiMarginLoss(), lambda learn: learn.pct_train >= 0.5),
                       (ScheduledLoss([nn.CrossEntropyLoss(), penalty], [1., SchedLin(0., 1.)]), lambda learn: learn.pct_train >= 0.75)],
                      verbose=False)
    class Current(Callback):
        order = 100
        def before_fit(self): self.current = []
        def after_loss(self):
            if self.training: self.current.append(self.learn.loss_func.current)
    learn = learner(loss, cbs=[Current()])
    learn.fit_phases([TrainingPhase(iters=8), TrainingPhase(iters=8)])
    assert learn.current.current == [0] * 8 + [1] * 4 + [2] * 4
    components = learn.recorder.loss_components
    assert sorted(components) == ['cross_entropy_loss', 'multi_margin_loss', 'penalty']
    assert np.isnan(components['penalty'][:12]).all() and not np.isnan(components['penalty'][12:]).any()
    inner = loss.losses[2]
    assert inner.pct == pytest.approx(learn.pct_train)   # progress forwarded to the inner ScheduledLoss
    state = loss.state_dict()
    assert state == {'current': 2, 'loss': {'pct': inner.pct}}


def test_switch_message_once_and_state_round_trip(tmp_path):
    loss = SwitchLoss([nn.CrossEntropyLoss(), (nn.MultiMarginLoss(), lambda learn: learn.epoch >= 1)])
    learn = learner(loss)
    out = io.StringIO()
    with contextlib.redirect_stdout(out): learn.fit(3)
    assert out.getvalue().count('SwitchLoss:') == 1 and 'at epoch 1, batch 0' in out.getvalue()
    torch.save(loss.state_dict(), tmp_path / 'loss.pt')
    fresh = SwitchLoss([nn.CrossEntropyLoss(), (nn.MultiMarginLoss(), lambda learn: learn.epoch >= 1)])
    fresh.load_state_dict(torch.load(tmp_path / 'loss.pt', weights_only=True))
    assert fresh.current == 1


def test_pickle_and_copy_leave_the_learner_behind():
    loss = ScheduledLoss([F.cross_entropy, penalty], [1., SchedLin(0., 1.)])
    learn = learner(loss); learn.fit_phases([TrainingPhase(iters=3)])
    assert loss.learn is learn
    for other in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        assert other.learn is None and other.pct == loss.pct and other.names == loss.names


def test_lr_find_with_scheduled_loss():
    loss = ScheduledLoss([nn.CrossEntropyLoss(), penalty], [1., SchedLin(0., 0.1)])
    learn = learner(loss)
    with contextlib.redirect_stdout(io.StringIO()): learn.lr_find(num_it=20, show_plot=False)
    learn.fit(1)
    assert len(learn.recorder.loss_components['penalty']) == len(learn.dls.train)


def test_no_host_syncs_per_batch():
    def count(n_epoch):
        loss = ScheduledLoss([nn.CrossEntropyLoss(), penalty], [1., SchedLin(0., 0.1)])
        learn = learner(loss)
        learn.fit(1)
        with SyncCounter() as counter: learn.fit(n_epoch)
        return counter.by_origin('phaselearn')
    assert count(4) <= 2 * count(2) and count(2) < 20
