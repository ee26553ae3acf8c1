"""Cancelled batches leave no trace: every cancel exception raised at every event, in training and in validation, with
every shipped callback attached; the epoch table (train_loss, valid_loss, metrics), the batch losses and the smoothed
loss must equal those computed by hand over the batches that completed uncancelled, as a witness callback saw them."""
import math, warnings
import pytest
import torch
from torch import nn
from phaselearn.all import *
from phaselearn.callback import all_events
from phaselearn.metrics import batch_size
from phaselearn.recorder import quiet
from phaselearn.rnn import char_stream, synthetic_text

torch.set_num_threads(1)  # hundreds of tiny fits: threads only add overhead (and contend with parallel test workers)

EXCEPTIONS = [CancelBatchException, CancelStepException, CancelTrainException, CancelValidException,
              CancelEpochException, CancelFitException]
TRAIN_BATCH = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step',
               'after_step', 'after_batch']
VALID_BATCH = ['before_batch', 'after_pred', 'after_loss', 'after_batch']
# (event, pass): where the canceller raises; 'fit' = events outside the passes
PLACES = ([('before_fit', 'fit'), ('before_epoch', 'fit'), ('before_train', 'train')] + [(e, 'train') for e in TRAIN_BATCH]
          + [('after_train', 'train'), ('before_validate', 'valid')] + [(e, 'valid') for e in VALID_BATCH]
          + [('after_validate', 'valid'), ('after_epoch', 'fit'), ('after_fit', 'fit')])
BEFORE_AFTER_BATCH = TRAIN_BATCH[:-1]  # a batch cancelled at one of these never reaches after_batch uncancelled


def caught(exc, event, where) -> bool:
    "Whether the loop handles `exc` raised at `event` (otherwise it leaves the fit, as in fastai)."
    batch = (event in TRAIN_BATCH) if where == 'train' else (event in VALID_BATCH) if where == 'valid' else False
    if exc is CancelBatchException: return batch and event != 'after_batch'
    if exc is CancelStepException: return where == 'train' and event in ('before_step', 'after_step')
    if exc is CancelTrainException: return where == 'train' and (batch or event == 'before_train')
    if exc is CancelValidException: return where == 'valid' and (batch or event == 'before_validate')
    if exc is CancelEpochException: return where in ('train', 'valid') or event == 'before_epoch'
    if exc is CancelFitException: return event != 'after_fit'


class Canceller(Callback):
    "Raises `exc` at `event` of epoch 0, in the pass `where`, at the batches in `iters` (batch events only)."
    order = 1000  # last: at after_batch every other callback has already seen the batch
    def __init__(self, exc, event, where, iters):
        self.exc, self.event, self.where, self.iters, self.raised = exc, event, where, iters, []
    def _maybe_raise(self):
        learn = self.learn
        if self.event not in ('before_fit', 'after_fit') and learn.epoch != 0: return
        if self.where != 'fit' and learn.training != (self.where == 'train'): return
        if self.event in TRAIN_BATCH and self.iters is not None:
            if learn.iter not in self.iters: return
            self.raised.append((learn.epoch, learn.training, learn.iter))
        raise self.exc()


# events are found on the class: declare them all, each raises when it is the chosen one
for _event in all_events:
    setattr(Canceller, _event, (lambda name: lambda self: self._maybe_raise() if self.event == name else None)(_event))


class Witness(Callback):
    "Sees every loss the learner computes (first, at after_loss), and which epochs, validations and rows happened."
    order = -1000
    def __init__(self): self.losses, self.validated, self.epochs = {}, set(), []
    def after_loss(self):
        learn = self.learn
        correct = None
        if learn.pred is not None and learn.pred.ndim == 2 and learn.yb[0].ndim == 1:
            correct = (learn.pred.argmax(-1) == learn.yb[0]).float().sum().item()
        self.losses[(learn.epoch, learn.training, learn.iter)] = (learn.loss.float().item(), batch_size(learn.yb), correct)
    def after_validate(self): self.validated.add(self.learn.epoch)
    def after_epoch(self): self.epochs.append(self.learn.epoch)


def _mean(items):
    n = sum(size for _, size in items)
    return math.fsum(value * size for value, size in items) / n if n else math.nan


def expected(witness, canceller, exc, with_metric):
    "The epoch rows, batch losses and smoothed losses computed by hand from what the witness saw."
    cancelled = set()
    step_skipped = exc is CancelStepException and canceller.event in ('before_step', 'after_step')  # the batch goes on
    if canceller.event in BEFORE_AFTER_BATCH and not step_skipped: cancelled = set(canceller.raised)
    counted = {k: v for k, v in witness.losses.items() if k not in cancelled}
    rows, batch_losses = [], []
    for epoch in witness.epochs:
        train = [(loss, size) for (e, training, _), (loss, size, _) in sorted(counted.items()) if e == epoch and training]
        row = [epoch, _mean(train)]
        valid = [v for (e, training, _), v in sorted(counted.items()) if e == epoch and not training]
        if epoch in witness.validated:
            row.append(_mean([(loss, size) for loss, size, _ in valid]))
            if with_metric: row.append(_mean([(correct / size, size) for _, size, correct in valid]))
        else: row += [math.nan] * (2 if with_metric else 1)
        rows.append(row)
    batch_losses = [loss for (_, training, _), (loss, _, _) in sorted(counted.items()) if training]
    beta, raw, smooth = 0.98, 0., []
    for i, loss in enumerate(batch_losses):
        raw = beta * raw + (1 - beta) * loss
        smooth.append(raw / (1 - beta ** (i + 1)))
    return rows, batch_losses, smooth


def close(a, b, tol=1e-4):
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1., abs(b))


def classification_learner(tmp_path, cbs, model=None):
    set_seed(0)
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    dls = DataLoaders.from_tensors(x[:48], y[:48], x[48:], y[48:], bs=16, shuffle=False)
    model = model or nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=[accuracy], cbs=cbs, path=tmp_path), True


def rnn_learner(tmp_path, cbs):
    set_seed(0)
    stream, vocab = char_stream(synthetic_text(60, seed=0))
    split = int(len(stream) * 0.8)
    dls = DataLoaders(LMDataLoader(stream[:split], bs=4, bptt=8), LMDataLoader(stream[split:], bs=4, bptt=8))
    # three batches per pass at most keeps the matrix fast
    dls = DataLoaders(_Take(dls.train, 3), _Take(dls.valid, 3))
    model = CharLM(len(vocab), emb_size=8, hidden_size=16, n_layers=1)
    return Learner(dls, model, loss_func=lm_loss, cbs=cbs, path=tmp_path), False


class _Take:
    "The first `n` batches of `loader`."
    def __init__(self, loader, n): self.loader, self.n = loader, n
    def __len__(self): return min(self.n, len(self.loader))
    def __iter__(self):
        for i, batch in zip(range(len(self)), self.loader): yield batch


def _tensorboard():
    try: import tensorboard  # noqa: F401
    except ImportError: return None
    return lambda tmp: [TensorBoardCallback(log_dir=tmp / 'runs', every_n=1)]


CALLBACKS = {  # name -> (callbacks factory, learner factory, fit method)
    'defaults': (lambda tmp: [], classification_learner, 'fit'),
    'ShowGraphCallback': (lambda tmp: [ShowGraphCallback()], classification_learner, 'fit'),
    'CSVLogger': (lambda tmp: [CSVLogger()], classification_learner, 'fit'),
    'TensorBoardCallback': (_tensorboard(), classification_learner, 'fit'),
    'PhaseScheduler': (lambda tmp: [], classification_learner, 'fit_one_cycle'),
    'EarlyStoppingCallback': (lambda tmp: [EarlyStoppingCallback(patience=5)], classification_learner, 'fit'),
    'SaveModelCallback': (lambda tmp: [SaveModelCallback()], classification_learner, 'fit'),
    'ReduceLROnPlateau': (lambda tmp: [ReduceLROnPlateau()], classification_learner, 'fit'),
    'TerminateOnNaNCallback': (lambda tmp: [TerminateOnNaNCallback()], classification_learner, 'fit'),
    'GradientAccumulation': (lambda tmp: [GradientAccumulation(2)], classification_learner, 'fit'),
    'GradientClip': (lambda tmp: [GradientClip(0.1)], classification_learner, 'fit'),
    'EMACallback': (lambda tmp: [EMACallback(0.9)], classification_learner, 'fit'),
    'MixedPrecision': (lambda tmp: [MixedPrecision(torch.bfloat16)], classification_learner, 'fit'),
    'FP16Training': (lambda tmp: [FP16Training()], classification_learner, 'fit'),
    'RNNCallback': (lambda tmp: [RNNCallback()], rnn_learner, 'fit'),
    'RNNRegularizer': (lambda tmp: rnn_cbs(), rnn_learner, 'fit'),
    'CheckpointCallback': (lambda tmp: [CheckpointCallback(every_iters=2)], classification_learner, 'fit'),
}


def run_case(tmp_path, name, exc, event, where):
    make_cbs, make_learner, method = CALLBACKS[name]
    learn, with_metric = make_learner(tmp_path, make_cbs(tmp_path))
    witness = Witness()
    iters = ({0, 2} if exc is CancelBatchException else {1}) if event in TRAIN_BATCH else None
    canceller = Canceller(exc, event, where, iters)
    learn.add_cbs([witness, canceller])
    fit = (lambda: learn.fit_one_cycle(2, lr_max=1e-2)) if method == 'fit_one_cycle' else (lambda: learn.fit(2, lr=1e-2))
    with quiet(learn), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # NaN metrics of an emptied validation warn
        if caught(exc, event, where): fit()
        else:
            with pytest.raises(exc): fit()
    if event in TRAIN_BATCH and where != 'fit':
        assert canceller.raised, f"the canceller never raised at {event} ({where})"  # the case tests something
    rows, batch_losses, smooth = expected(witness, canceller, exc, with_metric)
    values = learn.recorder.values
    assert len(values) == len(rows), (values, rows)
    for got, want in zip(values, rows):
        assert got[0] == want[0]
        assert all(close(g, w) for g, w in zip(got[1:-1], want[1:])), f"row {got[:-1]} != expected {want}"
    assert len(learn.recorder.batch_losses) == len(batch_losses)
    assert all(close(g, w) for g, w in zip(learn.recorder.batch_losses, batch_losses))
    assert all(close(g, w) for g, w in zip(learn.recorder.losses, smooth))
    for term in [cb for cb in learn.cbs if isinstance(cb, LossTerm)]:  # RNNRegularizer: one term per counted batch
        assert len(term.values) == len(term.weights) == len(batch_losses), (term, len(term.values), len(batch_losses))
    return learn


@pytest.mark.parametrize('exc', EXCEPTIONS, ids=lambda e: e.__name__)
@pytest.mark.parametrize('name', [n for n, v in CALLBACKS.items() if v[0] is not None])
def test_cancel_everywhere(tmp_path, name, exc):
    for event, where in PLACES:
        try: run_case(tmp_path, name, exc, event, where)
        except Exception as e:
            raise AssertionError(f"{name}: {exc.__name__} at {event} ({where}): {type(e).__name__}: {e}") from e


@pytest.mark.parametrize('event', ['before_batch', 'after_pred'])
def test_fresh_learner_cancelled_first_batch(tmp_path, event):
    "The bug report: a batch cancelled before its loss exists, on a learner that never trained."
    learn, _ = classification_learner(tmp_path, [])
    learn.add_cb(Canceller(CancelBatchException, event, 'train', {0}))
    with quiet(learn): learn.fit(1)
    assert len(learn.recorder.batch_losses) == len(learn.dls.train) - 1


def test_trained_learner_does_not_log_a_stale_loss(tmp_path):
    learn, _ = classification_learner(tmp_path, [])
    with quiet(learn): learn.fit(1)
    canceller = Canceller(CancelBatchException, 'before_batch', 'train', {0, 1, 2})
    learn.add_cb(canceller)
    with quiet(learn): learn.fit(1)
    assert learn.recorder.batch_losses == [] and math.isnan(learn.recorder.values[0][1])


class CancelFirstValid(Callback):
    order = 1000
    def after_loss(self):
        if not self.learn.training and self.learn.iter == 0: raise CancelBatchException()


def test_cancelled_validation_batch_is_in_no_metric_nor_prediction(tmp_path):
    learn, _ = classification_learner(tmp_path, [])
    with quiet(learn): learn.fit(1)
    preds, targets = learn.get_preds()
    first = len(next(iter(learn.dls.valid))[0])
    rest_preds, rest_targets = preds[first:], targets[first:]  # the first batch is the cancelled one
    loss, acc = learn.validate(cbs=[CancelFirstValid()])
    assert close(loss, nn.functional.cross_entropy(rest_preds, rest_targets).item(), tol=1e-5)
    assert close(acc, accuracy(rest_preds, rest_targets).item(), tol=1e-6)
    with learn.added_cbs([CancelFirstValid()]): kept_preds, kept_targets = learn.get_preds()
    assert torch.equal(kept_targets, rest_targets) and torch.allclose(kept_preds, rest_preds)
