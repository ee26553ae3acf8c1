"Integration tests for phaselearn.tracking: trackers in real fits on the digits, atomic saves, lr scales under schedules, TensorBoard."
import contextlib, copy, io, math, os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from phaselearn.all import *

torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine


class Script(Callback):
    "Overwrite column `name` of each epoch's row with `values[epoch]` (between the Recorder and the trackers)."
    order, run_after, run_in_lr_find = 55, Recorder, False
    def __init__(self, values, name='valid_loss'): self.values, self.column_name = list(values), name
    def after_epoch(self):
        row = self.learn.recorder.values[-1]
        row[self.learn.recorder.names.index(self.column_name)] = self.values[self.learn.epoch]


class KeepWeights(Callback):
    order, run_after = 60, Recorder
    def before_fit(self): self.weights = []
    def after_epoch(self): self.weights.append(copy.deepcopy(self.learn.model.state_dict()))


def same_weights(a, b): return all(torch.equal(a[k], b[k]) for k in a)


def two_groups(model): return [list(model[0].parameters()), list(model[2].parameters())]


def digits_learner(cbs=(), **kwargs):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    kwargs.setdefault('metrics', [accuracy])
    learn = Learner(digits_dls(bs=64, seed=0), model, loss_func=nn.CrossEntropyLoss(), lr=1e-2, cbs=list(cbs), **kwargs)
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


def quietly(f, *args, **kwargs):
    out = io.StringIO()
    with contextlib.redirect_stdout(out): f(*args, **kwargs)
    return out.getvalue()


# ---- early stopping ----

@pytest.mark.parametrize('patience', [1, 2, 3])
def test_early_stopping_epoch_matches_hand_count(patience):
    "Stop epoch = first epoch at which `patience` epochs in a row failed to beat the best (counted by hand)."
    values = [0.9, 0.8, 0.85, 0.7, 0.75, 0.76, 0.74, 0.6, 0.65, 0.66, 0.67, 0.68]
    best, wait, expected = math.inf, 0, None
    for epoch, v in enumerate(values):
        if v < best: best, wait = v, 0
        else: wait += 1
        if wait >= patience: expected = epoch; break
    early = EarlyStoppingCallback(patience=patience)
    learn = digits_learner([Script(values), early])
    printed = quietly(learn.fit, len(values))
    assert len(learn.recorder.values) == expected + 1 and early.stopped_epoch == expected
    assert printed.strip() == early.message and f"after epoch {expected}:" in early.message


def test_early_stopping_nan_valid_loss_counts_as_no_improvement():
    "A real NaN validation loss (NaN weights in the last layer's bias after epoch 0) never improves: stop after patience."
    class BreakModel(Callback):
        def after_epoch(self):
            if self.epoch == 0:
                with torch.no_grad(): self.learn.model[2].bias[0] = float('nan')
    early = EarlyStoppingCallback(patience=2)
    learn = digits_learner([BreakModel(), early], metrics=[])
    printed = quietly(learn.fit, 6)
    assert math.isnan(learn.recorder.values[1][2]) and len(learn.recorder.values) == 3
    assert early.best_epoch == 0 and 'for 2 epochs (best' in printed


def test_early_stopping_reset_on_fit_false_counts_across_fits():
    early = EarlyStoppingCallback(patience=2, reset_on_fit=False)
    learn = digits_learner([early])
    learn.add_cb(Script([0.5, 0.6]))
    quietly(learn.fit, 2)
    assert (early.best, early.wait) == (0.5, 1)
    learn.remove_cb(Script); learn.add_cb(Script([0.7, 0.1]))
    printed = quietly(learn.fit, 2)
    assert len(learn.recorder.values) == 1 and printed.startswith('Early stopping after epoch 0')
    learn.remove_cb(Script); learn.add_cb(Script([0.7, 0.1]))
    early.reset_on_fit = True
    assert quietly(learn.fit, 2) == '' and early.best == 0.1


def test_monitor_errors_list_valid_names():
    for cls in (EarlyStoppingCallback, SaveModelCallback, ReduceLROnPlateau, TrackerCallback):
        learn = digits_learner([cls(monitor='valid_accuracy')])
        with pytest.raises(ValueError, match="valid names: train_loss, valid_loss, accuracy"):
            learn.fit(1)
        assert learn.train_iter == 0
    learn = Learner(digits_dls(), nn.Linear(64, 10), loss_func=nn.CrossEntropyLoss(), cbs=[TrackerCallback()], default_cbs=False)
    with pytest.raises(ValueError, match='needs its Recorder'): learn.fit(1)


# ---- save model ----

def test_save_model_is_atomic(tmp_path, monkeypatch):
    "A crash while writing a better model leaves the previous file whole (and no temporary file); after_fit loads it."
    learn = digits_learner([Script([0.5, 0.4, 0.3]), SaveModelCallback(), keep := KeepWeights()], path=tmp_path)
    real_save = torch.save
    class Crash(Exception): pass
    def crashing_save(obj, f, *args, **kwargs):
        if learn.epoch == 2:
            f.write(b'half a file'); raise Crash()
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', crashing_save)
    with pytest.raises(Crash): learn.fit(3)
    monkeypatch.setattr(torch, 'save', real_save)
    assert sorted(os.listdir(tmp_path/'models')) == ['model.pt']
    saved = torch.load(tmp_path/'models'/'model.pt', weights_only=True)['model']
    assert same_weights(saved, keep.weights[1]) and same_weights(learn.model.state_dict(), keep.weights[1])


def test_save_model_with_opt_and_accuracy(tmp_path):
    save = SaveModelCallback(monitor='accuracy', with_opt=True, fname='best')
    learn = digits_learner([Script([0.8, 0.95, 0.9], 'accuracy'), save, keep := KeepWeights()], path=tmp_path)
    learn.fit(3)
    state = torch.load(tmp_path/'models'/'best.pt', weights_only=True)
    assert 'opt' in state and save.best_epoch == 1
    assert same_weights(learn.model.state_dict(), keep.weights[1])


def test_save_model_nothing_saved_when_never_finite(tmp_path):
    learn = digits_learner([Script([math.nan, math.nan]), SaveModelCallback(), keep := KeepWeights()], path=tmp_path)
    learn.fit(2)
    assert not (tmp_path/'models').exists() and same_weights(learn.model.state_dict(), keep.weights[1])


def test_trackers_stay_out_of_lr_find(tmp_path):
    learn = digits_learner([SaveModelCallback(), EarlyStoppingCallback(), ReduceLROnPlateau(), TerminateOnNaNCallback()],
                           path=tmp_path)
    quietly(learn.lr_find, num_it=20, show_plot=False)
    assert not (tmp_path/'models').exists()
    assert len([cb for cb in learn.cbs if isinstance(cb, (TrackerCallback, TerminateOnNaNCallback))]) == 4


# ---- reduce lr on plateau ----

def test_plateau_reduces_exactly_when_it_should():
    "Reduction epochs and rates against a hand simulation of the rule (patience 2, factor 0.5, min_lr 2e-3)."
    values = [1.0, 0.9, 0.95, 0.91, 0.92, 0.85, 0.86, 0.87, 0.88, 0.89, 0.8, 0.81, 0.82, 0.83, 0.84]
    best, wait, lr, lrs, events = math.inf, 0, 1e-2, [], 0
    for v in values:
        lrs.append(lr)
        if v < best: best, wait = v, 0
        else: wait += 1
        if wait >= 2: wait, lr, events = 0, (max(lr * 0.5, 2e-3) if lr > 2e-3 else lr), events + 1
    assert lrs[-1] == 2e-3 and events == 5
    plateau = ReduceLROnPlateau(patience=2, factor=0.5, min_lr=2e-3)
    learn = digits_learner([Script(values), plateau])
    quietly(learn.fit, len(values))
    n = len(learn.dls.train)
    np.testing.assert_allclose(learn.recorder.hyper('lr')[::n, 0], lrs, rtol=1e-12)
    assert len(plateau.messages) == events and 'already at min_lr' in plateau.messages[-1]


def test_plateau_multiplies_schedule_across_optimizer_switch():
    "Two phases (Adam cosine, then SGD linear, two layer groups): after the reduction every rate is preview x factor."
    learn = digits_learner(splitter=two_groups)
    phases = [TrainingPhase(epochs=2, lr=SchedCos(slice(1e-3, 1e-2), slice(1e-4, 1e-3))),
              TrainingPhase(epochs=2, lr=SchedLin(1e-2, 1e-3), opt_func=torch.optim.SGD)]
    expected = learn.preview(phases)['lr'].copy()
    plateau = ReduceLROnPlateau(factor=0.2)
    quietly(learn.fit_phases, phases, cbs=[Script([1.0, 1.0, 0.5, 0.4]), plateau])
    n = len(learn.dls.train)
    expected[2 * n:] *= 0.2
    assert isinstance(learn.opt.opt, torch.optim.SGD)
    np.testing.assert_allclose(learn.recorder.hyper('lr'), expected, rtol=1e-12)


def test_plateau_attached_for_good_resets_per_fit_and_stays_out_of_lr_find():
    plateau = ReduceLROnPlateau()
    learn = digits_learner([plateau])
    learn.add_cb(Script([1.0, 1.0]))
    quietly(learn.fit, 2)
    assert learn.opt.hyper_scales == {'lr': [pytest.approx(0.1)]}
    assert learn.opt.get_hyper('lr') == [pytest.approx(1e-3)]
    # lr_find sweeps the unscaled rates: same as a learner that never had the callback
    quietly(learn.lr_find, num_it=10, show_plot=False)
    reference = digits_learner(); reference.create_opt()
    quietly(reference.lr_find, num_it=10, show_plot=False)
    swept, reference_swept = learn.lr_find_result.lrs, reference.lr_find_result.lrs
    k = min(len(swept), len(reference_swept)); assert k >= 3
    np.testing.assert_allclose(swept[:k], reference_swept[:k], rtol=1e-12)
    # the next fit starts from the learner's lr again (reset_on_fit)
    learn.remove_cb(Script); learn.add_cb(Script([1.0]))
    quietly(learn.fit, 1)
    assert learn.recorder.hyper('lr')[0, 0] == pytest.approx(1e-2)


def test_plateau_reset_on_fit_false_keeps_reducing():
    plateau = ReduceLROnPlateau(reset_on_fit=False)
    learn = digits_learner([plateau, Script([1.0, 1.0])])
    quietly(learn.fit, 2)
    quietly(learn.fit, 2)   # starts at 1e-3; epoch 0 does not beat 1.0: another reduction
    n = len(learn.dls.train)
    np.testing.assert_allclose(learn.recorder.hyper('lr')[::n, 0], [1e-3, 1e-4], rtol=1e-12)


def test_plateau_state_resumes_through_checkpoint(tmp_path):
    "A fit with trackers interrupted after epoch 2 and resumed from its checkpoint ends with the same weights, scale and counters."
    checkpoint = pytest.importorskip('phaselearn.checkpoint')
    values = [1.0, 1.0, 0.9, 0.95, 0.95, 0.8]
    def make():
        return digits_learner([Script(values), ReduceLROnPlateau(), EarlyStoppingCallback(patience=3),
                               checkpoint.CheckpointCallback()], path=tmp_path)
    straight = make(); quietly(straight.fit_one_cycle, 6, 1e-2)
    class Stop(Callback):
        def after_epoch(self):
            if self.epoch == 2: raise KeyboardInterrupt
    broken = make()
    with pytest.raises(KeyboardInterrupt): quietly(broken.fit_one_cycle, 6, 1e-2, cbs=[Stop()])
    resumed = make(); quietly(resumed.fit_one_cycle, 6, 1e-2, resume='checkpoint')
    assert same_weights(resumed.model.state_dict(), straight.model.state_dict())
    def without_times(state):  # the recorder's epoch rows end with a wall time, which differs between runs
        if 'values' not in state: return state
        return {**state, 'values': [row[:-1] for row in state['values']]}
    for a, b in zip(resumed.cbs, straight.cbs): assert without_times(a.state_dict()) == without_times(b.state_dict()), type(a)
    assert resumed.opt.hyper_scales == straight.opt.hyper_scales


# ---- terminate on NaN ----

@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_terminate_on_nan_training_only(bad):
    class Inject(Callback):
        def __init__(self, training): self.on_training = training
        def after_loss(self):
            if self.training == self.on_training and self.epoch == 1 and self.iter == 2:
                self.learn.loss = torch.tensor(bad)
    learn = digits_learner([Inject(training=False), TerminateOnNaNCallback()])
    assert quietly(learn.fit, 2) == '' and len(learn.recorder.values) == 2
    learn = digits_learner([Inject(training=True), term := TerminateOnNaNCallback()])
    printed = quietly(learn.fit, 3)
    assert printed.strip() == term.message == f"Terminated at epoch 1, batch 2: the training loss is {bad}."
    assert len(learn.recorder.values) == 1


# ---- TensorBoard ----

def test_tensorboard_events_match_recorder(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = TensorBoardCallback(log_dir=tmp_path/'run', every_n=7)
    learn = digits_learner([board], splitter=two_groups)
    learn.fit_one_cycle(3, slice(1e-3, 1e-2))
    n = len(learn.dls.train)
    events = EventAccumulator(str(tmp_path/'run')); events.Reload()
    scalars = lambda tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
    steps, losses = scalars('train/smooth_loss')
    assert steps == list(range(7, 3 * n + 1, 7))
    np.testing.assert_allclose(losses, [learn.recorder.losses[s - 1] for s in steps], rtol=1e-6)
    for group in (0, 1):
        steps, lrs = scalars(f'hyper/lr/group_{group}')
        np.testing.assert_allclose(lrs, learn.recorder.hyper('lr')[np.array(steps) - 1, group], rtol=1e-6)
        _, moms = scalars(f'hyper/mom/group_{group}')
        np.testing.assert_allclose(moms, learn.recorder.hyper('mom')[np.array(steps) - 1, group], rtol=1e-6)
    for column, name in enumerate(learn.recorder.names):
        if name in ('epoch', 'time'): continue
        steps, values = scalars(f'epoch/{name}')
        assert steps == [n, 2 * n, 3 * n]
        np.testing.assert_allclose(values, [row[column] for row in learn.recorder.values], rtol=1e-6)
    # the step goes on across fits and through state_dict
    assert board.state_dict() == {'step': 3 * n} and board.writer is None
    learn.fit(1)
    assert board.step == 4 * n


def test_tensorboard_missing_says_how_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(ImportError, match='pip install tensorboard'): TensorBoardCallback()


def test_tensorboard_bad_hyper_name(tmp_path):
    pytest.importorskip('tensorboard')
    learn = digits_learner([TensorBoardCallback(log_dir=tmp_path, hypers=['momentum_typo'])])
    with pytest.raises(ValueError, match='valid names'): learn.fit(1)
