"""Nothing silently wrong: bad hyperparameter values and arguments refused with a message naming them, all-or-nothing
loads, damaged checkpoints detected, NaN stops that keep finite weights, resumes that restore before they skip."""
import functools, math, warnings, zipfile
from pathlib import Path
import pytest, torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from phaselearn.all import *
from phaselearn.tracking import TerminateOnNaNCallback  # not yet in phaselearn.all on this branch


def make_learner(path='.', cbs=(), **kwargs):
    set_seed(0)
    x, y, xv, yv = digits_tensors()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))
    learn = Learner(DataLoaders.from_tensors(x, y, xv, yv, bs=128, seed=1), model, loss_func=nn.CrossEntropyLoss(),
                    path=path, cbs=list(cbs), **kwargs)
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


def weights(learn): return [p.detach().clone() for p in learn.model.parameters()]
def assert_weights(learn, expected):
    for a, b in zip(weights(learn), expected): assert torch.equal(a, b)


# --- 6: hyperparameter values, by the optimizer's own rules --------------------------------------------------------------

@pytest.mark.parametrize('name,value,message', [
    ('mom', float('nan'), 'mom must be a number in [0, 1)'), ('mom', 2., 'mom must be a number in [0, 1)'),
    ('eps', -1., 'eps must be a finite number > 0'), ('sqr_mom', 1., 'sqr_mom must be a number in [0, 1)'),
    ('lr', float('inf'), 'lr must be a finite number >= 0'), ('wd', -0.1, 'wd must be a finite number >= 0'),
    ('mom', [0.9, 1.5], 'mom must be a number in [0, 1)'), ('lr', slice(-1e-3, 1e-2), 'lr must be'),
    ('lr', 'fast', 'lr must be a number (a float), got str'), ('mom', '0.9', 'mom must be a number (a float), got str')])
def test_set_hyper_checks_values_by_the_optimizers_rules(name, value, message):
    learn = make_learner(splitter=lambda m: [list(m[0].parameters()), list(m[3].parameters())])
    opt = learn.create_opt()
    before = [dict(h) for h in opt.hypers]
    with pytest.raises((ValueError, TypeError), match=None) as info: opt.set_hyper(name, value)
    assert message in str(info.value)
    assert opt.hypers == before


def test_sgd_momentum_is_not_bounded_by_one_but_adam_beta1_is():
    opt = make_learner(opt_func=torch.optim.SGD).create_opt()
    opt.set_hyper('mom', 1.5)
    with pytest.raises(ValueError, match='mom must be a finite number >= 0'): opt.set_hyper('mom', -0.5)


@pytest.mark.parametrize('phase,message', [
    (TrainingPhase(epochs=1, mom=2.), 'mom in phase 1'), (TrainingPhase(epochs=1, eps=-1.), 'eps in phase 1'),
    (TrainingPhase(epochs=1, mom=SchedCos(0.9, 1.1)), 'at iteration'), (TrainingPhase(epochs=1, lr=SchedLin(1e-2, -1e-2)), 'negative'),
    (TrainingPhase(epochs=1, lr=slice(1e-4, float('nan'))), 'lr'),
    (TrainingPhase(epochs=1, lr=lambda pct: 'fast'), 'lr in phase 1'),
    (TrainingPhase(epochs=1, betas=(0.9, 0.99)), 'set mom (betas[0]) and sqr_mom (betas[1])')])
def test_every_value_of_a_plan_is_checked_before_the_first_batch(phase, message):
    learn = make_learner()
    before = weights(learn)
    with pytest.raises((ValueError, TypeError)) as info: learn.fit_phases([TrainingPhase(iters=3), phase])
    assert message in str(info.value), str(info.value)
    assert_weights(learn, before)


def test_a_string_hyperparameter_is_refused_when_the_phase_is_built():
    with pytest.raises(TypeError, match=r"TrainingPhase\(mom='0.9'\): a hyperparameter is a number"): TrainingPhase(epochs=1, mom='0.9')


def test_a_plan_message_names_hyperparameter_phase_iteration_and_range():
    learn = make_learner()
    with pytest.raises(ValueError) as info: learn.fit_phases([TrainingPhase(iters=10, mom=SchedLin(0.9, 1.4))])
    text = str(info.value)
    assert text.startswith('mom in phase 0') and 'at iteration 2' in text and 'in [0, 1)' in text


def test_loss_weight_schedule_turning_nan_is_refused_before_training():
    half_nan = lambda pct: 0.1 if pct < 0.5 else float('nan')
    learn = make_learner()
    learn.loss_func = ScheduledLoss([nn.CrossEntropyLoss(), lambda pred, y: pred.abs().mean()], [1., half_nan])
    before = weights(learn)
    with pytest.raises(ValueError, match='is nan at iteration'): learn.fit(2)
    assert_weights(learn, before)
    learn.loss_func = ScheduledLoss([nn.CrossEntropyLoss(), lambda pred, y: pred.abs().mean()], [1., 0.1])
    with pytest.raises(ValueError, match=r'loss_weights\[1\] in phase 0'): learn.fit_phases([TrainingPhase(epochs=1, loss_weights=[1., half_nan])])
    assert_weights(learn, before)


def test_a_value_turning_non_finite_while_training_is_an_error_not_a_nan_model():
    broken = [False]
    def flaky(pct): return float('nan') if broken[0] else 1e-2  # not a function of the position alone
    class BreakAt(Callback):
        order = -60  # before the phase scheduler sets the batch's values
        def before_batch(self):
            if self.training and self.train_iter == 3: broken[0] = True
    learn = make_learner()
    with pytest.raises(ValueError, match='lr must be a finite number >= 0'):
        learn.fit_phases([TrainingPhase(epochs=1, lr=flaky)], cbs=[BreakAt()])
    assert learn.train_iter == 3 and all(torch.isfinite(p).all() for p in learn.model.parameters())


# --- 9: clear errors for bad arguments ---------------------------------------------------------------------------------

def test_bad_learner_arguments_name_the_argument():
    x, y, xv, yv = digits_tensors(); dls = DataLoaders.from_tensors(x, y, xv, yv)
    with pytest.raises(TypeError, match='pass the class, e.g. torch.optim.Adam'): Learner(dls, nn.Linear(64, 10), opt_func='adam')
    with pytest.raises(TypeError, match='dls must be a DataLoaders'): Learner(None, nn.Linear(64, 10))
    with pytest.raises(TypeError, match="lr must be a number \\(a float\\), got str"): Learner(dls, nn.Linear(64, 10), lr='1e-3')
    learn = make_learner()
    for call, name in [(lambda: learn.fit(1, lr='0.1'), 'lr'), (lambda: learn.fit_one_cycle(1, lr_max='0.1'), 'lr_max'),
                       (lambda: learn.fit_one_cycle(1, moms=('0.95', 0.85, 0.95)), 'moms'),
                       (lambda: learn.create_opt().set_hyper('mom', 'high'), 'mom')]:
        with pytest.raises(TypeError) as info: call()
        assert str(info.value).startswith(name) and 'must be a number (a float), got str' in str(info.value), str(info.value)
    with pytest.raises(TypeError, match=r"^TrainingPhase\(lr='0.1'\): a hyperparameter is a number"): TrainingPhase(epochs=1, lr='0.1')


def test_checkpoint_fname_is_checked_at_construction():
    with pytest.raises(TypeError, match='fname must be a file name or path'): CheckpointCallback(fname=3)


def test_betas_is_accepted_by_set_hyper_and_refused_by_a_phase():
    opt = make_learner().create_opt()
    opt.set_hyper('betas', (0.8, 0.9))
    assert (opt.get_hyper('mom'), opt.get_hyper('sqr_mom')) == ([0.8], [0.9])
    with pytest.raises(ValueError, match=r'betas\[1\] must be a number in \[0, 1\)'): opt.set_hyper('betas', (0.8, 1.5))
    with pytest.raises(ValueError, match='set mom'): make_learner().fit_phases([TrainingPhase(epochs=1, betas=(0.9, 0.99))])


def test_a_partials_lr_is_the_learners_lr():
    learn = make_learner(opt_func=functools.partial(torch.optim.SGD, lr=0.5))
    assert learn.lr == 0.5
    learn.fit(1)
    assert learn.opt.get_hyper('lr') == [0.5]
    assert make_learner(opt_func=functools.partial(torch.optim.SGD, lr=0.5), lr=0.1).lr == 0.1
    assert make_learner().lr == 1e-3


# --- 5 and 10.8: loads --------------------------------------------------------------------------------------------------

def test_load_is_all_or_nothing(tmp_path):
    learn = make_learner(tmp_path); learn.fit(1); learn.save('adam', with_opt=True)
    other = make_learner(tmp_path, opt_func=torch.optim.SGD); other.create_opt()
    before = weights(other)
    with pytest.raises(LoadError, match='optimizer state does not fit'): other.load('adam')
    assert_weights(other, before)
    split = make_learner(tmp_path, splitter=lambda m: [list(m[0].parameters()), list(m[3].parameters())]); split.create_opt()
    before = weights(split)
    with pytest.raises(LoadError, match='layer group'): split.load('adam')
    assert_weights(split, before)


def test_load_reads_a_plain_state_dict_and_says_what_a_bad_file_is(tmp_path):
    learn = make_learner(tmp_path); learn.fit(1)
    (tmp_path / 'models').mkdir(exist_ok=True)
    torch.save(learn.model.state_dict(), tmp_path / 'models' / 'plain.pt')
    fresh = make_learner(tmp_path); fresh.load('plain')
    assert_weights(fresh, weights(learn))
    torch.save([1, 2, 3], tmp_path / 'models' / 'list.pt')
    with pytest.raises(LoadError) as info: fresh.load('list')
    assert 'holds a list, not model weights; expected a file written by learn.save' in str(info.value)
    (tmp_path / 'models' / 'junk.pt').write_bytes(b'\x00' * 101)
    with pytest.raises(LoadError) as info: fresh.load('junk')
    text = str(info.value)
    assert 'truncated or damaged' in text and 'KeyError' not in text and 'expected a file written by learn.save' in text


# --- 7: checksums and leftovers ------------------------------------------------------------------------------------------

def flip_byte_in_tensor_data(file: Path):
    "Flip one byte inside the largest tensor's stored bytes (zip entries are stored uncompressed): the file still loads."
    with zipfile.ZipFile(file) as archive:
        info = max((i for i in archive.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    data = bytearray(file.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], 'little'), \
                          int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], 'little')
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    file.write_bytes(bytes(data))


def test_a_flipped_byte_is_detected_and_resume_falls_back_naming_the_file(tmp_path):
    reference = make_learner(tmp_path / 'ref'); reference.fit(2)
    learn = make_learner(tmp_path, cbs=[CheckpointCallback(every_epochs=1)])
    class Stop(Callback):
        def after_batch(self):
            if self.training and self.epoch == 1 and self.iter == 2: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): learn.fit(2, cbs=[Stop()])
    CheckpointCallback(every_epochs=1)  # the checkpoint after epoch 0 is the newest; write an older one under it
    files = checkpoint_files(learn, 'checkpoint')
    assert [f.name for f in files] == ['checkpoint.pt']
    # make two ranks: a good older one (a copy) and a damaged newest one
    files[0].replace(tmp_path / 'models' / 'checkpoint.1.pt')
    (tmp_path / 'models' / 'checkpoint.pt').write_bytes((tmp_path / 'models' / 'checkpoint.1.pt').read_bytes())
    flip_byte_in_tensor_data(tmp_path / 'models' / 'checkpoint.pt')
    torch.load(tmp_path / 'models' / 'checkpoint.pt', weights_only=True)  # the damage does not stop torch.load
    resumed = make_learner(tmp_path)
    with pytest.warns(RuntimeWarning, match=r'resuming from checkpoint.1.pt.*checkpoint.pt: damaged'):
        resumed.fit(2, resume='checkpoint')
    assert_weights(resumed, weights(reference))


def test_leftovers_of_a_killed_write_are_removed_by_the_next_write_and_by_resume(tmp_path):
    models = tmp_path / 'models'; models.mkdir()
    leftovers = [models / '.checkpoint.writing.pt', models / '..checkpoint.writing.pt.ab12cd.tmp']
    for f in leftovers: f.write_bytes(b'half')
    (models / 'other.pt').write_bytes(b'not ours')
    learn = make_learner(tmp_path, cbs=[CheckpointCallback(every_epochs=1)]); learn.fit(1)
    assert not any(f.exists() for f in leftovers) and (models / 'other.pt').exists()
    for f in leftovers: f.write_bytes(b'half')
    make_learner(tmp_path).fit(1, resume='checkpoint')
    assert not any(f.exists() for f in leftovers)


# --- 1, 3: resume restores before it skips; an order that cannot be replayed is an error -----------------------------

def test_resuming_a_finished_plan_restores_its_end_and_trains_nothing(tmp_path):
    phases = [TrainingPhase(epochs=1, lr=SchedCos(1e-2, 1e-3)), TrainingPhase(epochs=1, opt_func=torch.optim.SGD, lr=1e-2, mom=0.9)]
    learn = make_learner(tmp_path, cbs=[CheckpointCallback()]); learn.fit_phases(phases)
    resumed = make_learner(tmp_path, cbs=[CheckpointCallback()])
    class Count(Callback):
        def before_fit(self): self.n = 0
        def before_batch(self): self.n += 1
    count = Count()
    resumed.fit_phases(phases, cbs=[count], resume='checkpoint')
    assert count.n == 0
    assert_weights(resumed, weights(learn))
    assert isinstance(resumed.opt.opt, torch.optim.SGD) and resumed.train_iter == learn.train_iter
    for a, b in zip(learn.opt.opt.state.values(), resumed.opt.opt.state.values()): assert torch.equal(a['momentum_buffer'], b['momentum_buffer'])
    assert [f.name for f in checkpoint_files(resumed, 'checkpoint')] == ['checkpoint.pt', 'checkpoint.1.pt']


class Digits(Dataset):
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]


class Reversed(Sampler):
    "A custom sampler: its order cannot be replayed by phaselearn."
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __iter__(self): return iter(range(self.n - 1, -1, -1))


def test_an_order_that_cannot_be_replayed_is_a_clear_error_mid_epoch(tmp_path):
    x, y, xv, yv = digits_tensors()
    def learner(cbs=()):
        set_seed(0)
        dls = DataLoaders(DataLoader(Digits(x, y), batch_size=128, sampler=Reversed(len(x))), None)
        learn = Learner(dls, nn.Sequential(nn.Linear(64, 10)), loss_func=nn.CrossEntropyLoss(), path=tmp_path, cbs=list(cbs))
        learn.progress.show_bar = learn.progress.show_table = False
        return learn
    class Stop(Callback):
        def after_batch(self):
            if self.training and self.train_iter == 5: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): learner([CheckpointCallback(every_iters=3)]).fit(2, cbs=[Stop()])
    with pytest.raises(ValueError, match='cannot be replayed.*resume from a checkpoint written at an epoch boundary'):
        learner().fit(2, resume='checkpoint')


# --- 8: NaN stop ---------------------------------------------------------------------------------------------------------

def test_nan_stop_keeps_the_last_finite_weights_and_the_learner_fits_again():
    class InjectNaN(Callback):
        def before_batch(self):
            if self.training and self.train_iter == 4: xb = self.xb[0].clone(); xb[0, 0] = float('nan'); self.learn.xb = (xb,)
    class Snapshot(Callback):
        order = 100
        def after_batch(self):
            if self.training: self.weights = weights(self.learn)
    snapshot = Snapshot()
    learn = make_learner(cbs=[InjectNaN(), TerminateOnNaNCallback(), snapshot], opt_func=torch.optim.SGD)
    learn.fit(2)
    assert learn.train_iter == 4
    assert_weights(learn, snapshot.weights)                       # the weights after the last finite batch
    learn.remove_cb(InjectNaN); learn.fit(1)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
