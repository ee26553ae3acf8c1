"""GradientAccumulation and EMACallback: equivalence with big batches under every precision mode, overflow handling,
partial groups, DDP no_sync (one-process gloo group), EMA with fp16 master weights, lr_find, validate, checkpoints,
and host syncs."""
import contextlib, copy, io, os
import pytest
import torch
from torch import nn
from phaselearn.all import *
from test_syncs import SyncCounter

X_TRAIN, Y_TRAIN, X_VALID, Y_VALID = digits_tensors()
X_TRAIN, Y_TRAIN = X_TRAIN[:608], Y_TRAIN[:608]   # 9 batches of 64 and one of 32; 38 batches of 16


def learner(bs, cbs=(), opt_func=torch.optim.SGD, lr=0.1, model=None, **kwargs):
    set_seed(0)
    model = model or nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    dls = DataLoaders.from_tensors(X_TRAIN, Y_TRAIN, X_VALID, Y_VALID, bs=bs, seed=0)
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, lr=lr, wd=0.,
                   cbs=[Recorder(), *cbs], default_cbs=False, **kwargs)


def params(learn): return [p.detach().float().clone() for p in learn.model.parameters()]


class StepCount(Callback):
    order = 100
    def before_fit(self): self.steps = 0
    def after_step(self): self.steps += 1


@pytest.mark.parametrize('opt_func', [torch.optim.SGD, torch.optim.Adam])
def test_accumulation_equals_big_batch(opt_func):
    lr = 0.1 if opt_func is torch.optim.SGD else 1e-3
    big = learner(64, opt_func=opt_func, lr=lr); big.fit(2)
    small = learner(16, cbs=[GradientAccumulation(4), StepCount()], opt_func=opt_func, lr=lr); small.fit(2)
    for p, q in zip(params(big), params(small)): torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert small.step_count.steps == 20


@pytest.mark.parametrize('precision', ['bf16', 'fp16', 'fp16_classic'])
def test_accumulation_under_precision_close_to_big_batch(precision):
    def cbs():
        return {'bf16': [MixedPrecision(torch.bfloat16)], 'fp16': [MixedPrecision(torch.float16)],
                'fp16_classic': [FP16Training()]}[precision]
    big = learner(64, cbs=cbs()); big.fit(1)
    small = learner(16, cbs=[GradientAccumulation(4), StepCount(), *cbs()]); small.fit(1)
    assert small.step_count.steps == 10
    reference = learner(64); reference.fit(1)
    for p, q, r in zip(params(big), params(small), params(reference)):
        # accumulation adds no more error than the precision itself does
        assert (p - q).abs().max() <= 2 * (p - r).abs().max() + 1e-3


def test_fp16_scale_constant_within_group_and_overflow_skips_the_group():
    class InjectInf(Callback):
        def after_backward(self):
            if self.learn.train_iter == 1:  # second batch of the first group
                next(self.learn.model.parameters()).grad.view(-1)[0] = float('inf')
    mp = MixedPrecision(torch.float16)
    learn = learner(16, cbs=[GradientAccumulation(4), mp, InjectInf(), StepCount()])
    before = params(learn)
    learn.fit_phases([TrainingPhase(iters=4)])
    assert learn.step_count.steps == 0 and mp.skipped_steps == [3]
    assert all(torch.equal(a, b) for a, b in zip(before, params(learn)))
    assert mp.scale == 2. ** 15   # backed off once: one unscale per group, not per batch


def test_cancelled_pass_drops_the_partial_group():
    class CutShort(Callback):
        def before_batch(self):
            if self.training and self.epoch == 0 and self.iter == 6: raise CancelTrainException()
    class GradsAtStart(Callback):
        order = 100
        def before_fit(self): self.clean = []
        def before_train(self):
            self.clean.append(all(p.grad is None or not p.grad.any() for p in self.model.parameters()))
    learn = learner(16, cbs=[GradientAccumulation(4), CutShort(), GradsAtStart()])
    learn.fit(2)
    assert learn.grads_at_start.clean == [True, True]


def test_phase_ending_mid_epoch_steps_its_last_group():
    learn = learner(16, cbs=[GradientAccumulation(4), StepCount()])
    learn.fit_phases([TrainingPhase(iters=10), TrainingPhase(iters=5)])
    assert learn.step_count.steps == 3 + 2


def test_regulariser_added_in_after_loss_is_divided_too():
    class L2(Callback):
        order = 25   # after GradientAccumulation's order
        def after_loss(self):
            self.learn.loss_grad = self.learn.loss_grad + 1e-2 * sum(p.pow(2).sum() for p in self.model.parameters())
    big = learner(64, cbs=[L2()]); big.fit(1)
    small = learner(16, cbs=[GradientAccumulation(4), L2()]); small.fit(1)
    for p, q in zip(params(big), params(small)): torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_ddp_no_sync_on_accumulating_batches(tmp_path):
    import torch.distributed as dist
    if not dist.is_available(): pytest.skip("torch.distributed not available")
    dist.init_process_group('gloo', init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        set_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
        class SyncLog(Callback):
            order = 100
            def before_fit(self): self.sync = []
            def after_pred(self):
                if self.training: self.sync.append(self.model.require_backward_grad_sync)
        learn = learner(16, cbs=[GradientAccumulation(4), SyncLog()], model=model)
        learn.fit_phases([TrainingPhase(iters=10)])
        assert learn.sync_log.sync == [False, False, False, True, False, False, False, True, False, True]
        plain = learner(16, cbs=[GradientAccumulation(4)])
        plain.fit_phases([TrainingPhase(iters=10)])
        for p, q in zip(params(plain), params(learn)): torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    finally: dist.destroy_process_group()


def hand_ema(weights, start, decay, start_iter=0):
    expected = start
    for step, w in enumerate(weights):
        expected = w if step < start_iter else [decay * e + (1 - decay) * x for e, x in zip(expected, w)]
    return expected


def test_ema_follows_fp16_master_weights():
    class MasterLog(Callback):
        order = 100
        def before_fit(self): self.weights = [[p.detach().clone() for p in self.learn.opt_model.parameters()]]
        def after_step(self): self.weights.append([p.detach().clone() for p in self.learn.opt_model.parameters()])
    ema = EMACallback(decay=0.9, validate_with_ema=False)
    learn = learner(64, cbs=[FP16Training(), ema, MasterLog()])
    learn.fit(1)
    log = learn.master_log.weights
    expected = hand_ema(log[1:], log[0], 0.9)
    for e, p in zip(expected, ema.ema_model.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('precision', [None, 'bf16', 'fp16_classic'])
def test_ema_validation_leaves_training_unchanged(precision):
    cbs = {None: [], 'bf16': [MixedPrecision(torch.bfloat16)], 'fp16_classic': [FP16Training()]}[precision]
    with_ema = learner(64, cbs=[*copy.deepcopy(cbs), EMACallback(decay=0.9)]); with_ema.fit(2)
    without = learner(64, cbs=copy.deepcopy(cbs)); without.fit(2)
    assert all(torch.equal(p, q) for p, q in zip(params(with_ema), params(without)))
    assert with_ema.recorder.values[-1][2] != without.recorder.values[-1][2]


def test_ema_validate_outside_fit_and_restore():
    learn = learner(64, cbs=[EMACallback(decay=0.9)]); learn.fit(1)
    before = params(learn)
    ema_loss = nn.functional.cross_entropy(learn.ema.ema_model(X_VALID), Y_VALID).item()
    assert abs(learn.validate()[0] - ema_loss) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(before, params(learn)))


def test_ema_not_in_lr_find_and_checkpoint_round_trip(tmp_path):
    ema = EMACallback(decay=0.9)
    learn = learner(64, cbs=[ema]); learn.fit(1)
    state = copy.deepcopy(ema.state_dict())
    with contextlib.redirect_stdout(io.StringIO()): learn.lr_find(num_it=20, show_plot=False)
    assert ema.n_steps == state['n_steps'] and ema in learn.cbs
    for k, v in ema.state_dict()['ema'].items(): assert torch.equal(v, state['ema'][k])
    torch.save(ema.state_dict(), tmp_path / 'ema.pt')
    loaded = torch.load(tmp_path / 'ema.pt', weights_only=True)
    fresh = EMACallback(decay=0.9); fresh.load_state_dict(loaded)
    other = learner(64, cbs=[fresh]); other.fit_phases([TrainingPhase(iters=1)])
    assert fresh.n_steps == state['n_steps'] + 1


def test_ema_with_compiled_model():
    learn = learner(64, cbs=[EMACallback(decay=0.9, replace_at_end=True)])
    learn.model = torch.compile(learn.model, backend='eager')
    learn.fit_phases([TrainingPhase(iters=3)])
    assert not any(k.startswith('_orig_mod') for k in learn.ema.ema_model.state_dict())
    assert all(torch.equal(p, e) for p, e in zip(learn.model.parameters(), learn.ema.ema_model.parameters()))


def test_no_host_syncs_per_batch():
    "GradientAccumulation and EMACallback read nothing on the host: the syncs of a fit do not grow with batches."
    def count(n_epoch):
        learn = learner(16, cbs=[GradientAccumulation(4), EMACallback(decay=0.9)])
        learn.fit(1)
        with SyncCounter() as counter: learn.fit(n_epoch)
        return counter.by_origin('phaselearn')
    assert count(4) <= 2 * count(2) and count(2) < 20
