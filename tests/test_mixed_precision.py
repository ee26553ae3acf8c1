"""Mixed precision (MixedPrecision bf16/fp16, FP16Training) and GradientClip: accuracy against fp32, skipped steps,
master weights, layer groups, optimizer switches, freezing, save/load, lr_find's restore, host syncs, bad input.

CPU notes (probed, not assumed): torch runs float16 and bfloat16 autocast on CPU for linear layers, convolutions,
normalisation and losses. `nn.LSTM` under float16 *autocast* fails on some CPUs (oneDNN: "could not create a primitive
descriptor for the LSTM forward propagation primitive"); the LSTM test probes and skips that one case. bfloat16
autocast LSTMs and fp16-weight LSTMs (FP16Training) run on CPU.
"""
import contextlib, copy, io, math, sys, warnings
import numpy as np
import pytest
import torch
from torch import nn
from fastcore.test import test_eq as _test_eq
from phaselearn.all import *
from phaselearn.mixed_precision import _precision_cbs
from syncs import cuda_sync_warnings

MODES = ['bf16', 'fp16', 'fp16_classic']
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def precision_cbs(mode, **kwargs):
    if mode == 'fp32': return []
    if mode == 'bf16': return [MixedPrecision(torch.bfloat16, **kwargs)]
    if mode == 'fp16': return [MixedPrecision(torch.float16, **kwargs)]
    if mode == 'fp16_classic': return [FP16Training(**kwargs)]
    raise ValueError(mode)


def mlp():
    "A small MLP with a batch norm and a layer norm (both must stay fp32 under FP16Training)."
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                         nn.Linear(128, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))


def digits_learner(cbs=(), device='cpu', model=None, seed=0, **kwargs):
    set_seed(seed)
    model = mlp() if model is None else model
    dls = digits_dls(bs=64, seed=seed, device=device)
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), lr=1e-2, metrics=[accuracy], device=device,
                   cbs=[Recorder(), *cbs], default_cbs=False, **kwargs)


class InjectInf(Callback):
    "One gradient entry set to inf after the backward pass of the given training iterations (or every one)."
    def __init__(self, at=(), every=False): self.at, self.every = set(at), every
    def after_backward(self):
        if self.every or self.learn.train_iter in self.at:
            p = next(p for p in self.learn.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float('inf')


class StepLog(Callback):
    "Per training batch: whether the optimizer's parameters changed, the Adam step count, the loss scale, the lr."
    order = 100
    def __init__(self, precision=None): self.precision = precision
    def before_fit(self): self.changed, self.scales, self.lrs = [], [], []
    def before_batch(self):
        if self.training: self.before = [p.detach().clone() for g in self.opt.param_groups for p in g['params']]
    def after_batch(self):
        if not self.training: return
        now = [p.detach() for g in self.opt.param_groups for p in g['params']]
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(self.before, now)))
        self.scales.append(self.precision.scale if self.precision is not None else 1.)
        self.lrs.append(self.opt.get_hyper('lr'))


def params_of_opt(learn): return [p for g in learn.opt.param_groups for p in g['params']]


# ---------------------------------------------------------------------------------------------------------- accuracy

@pytest.fixture(scope='module')
def fp32_accuracy():
    learn = digits_learner()
    learn.fit_one_cycle(5, lr_max=1e-2)
    acc = learn.validate()[1]
    assert acc > 0.95, acc
    return acc


@pytest.mark.parametrize('mode', MODES)
def test_digits_accuracy_within_two_points_of_fp32(mode, fp32_accuracy):
    learn = digits_learner(precision_cbs(mode))
    learn.fit_one_cycle(5, lr_max=1e-2)
    acc = learn.validate()[1]
    assert abs(acc - fp32_accuracy) <= 0.02, (mode, acc, fp32_accuracy)
    assert all(math.isfinite(row[1]) for row in learn.recorder.values)


# ------------------------------------------------------------------------------------------------ skipping overflow

@pytest.mark.parametrize('mode', ['fp16', 'fp16_classic'])
def test_injected_inf_skips_exactly_that_step_and_halves_the_scale(mode):
    cb = precision_cbs(mode)[0]
    log = StepLog(cb)
    learn = digits_learner([cb, InjectInf(at=(3,)), log], wd=0.1, splitter=sequential_splitter)
    phases = [TrainingPhase(iters=8, lr=SchedCos(slice(1e-4, 1e-2), slice(1e-5, 1e-3)))]
    expected_lr = learn.preview(phases)['lr']
    learn.fit_phases(phases)
    _test_eq(log.changed, [True] * 3 + [False] + [True] * 4)        # decoupled decay (wd=0.1) skipped too
    _test_eq(log.scales, [2. ** 16] * 3 + [2. ** 15] * 5)
    _test_eq((cb.skipped, cb.skipped_steps, learn.recorder.skipped_steps), (1, [3], [3]))
    np.testing.assert_array_equal(np.array(log.lrs), expected_lr)  # the schedule kept its position
    steps = {int(state['step']) for state in learn.opt.opt.state.values()}
    _test_eq(steps, {7})                                            # optimizer state untouched by the skipped step
    assert all(math.isfinite(p.detach().float().abs().sum()) for p in learn.model.parameters())


@pytest.mark.parametrize('mode', ['fp16', 'fp16_classic'])
def test_every_step_overflowing_stops_with_a_clear_error(mode):
    learn = digits_learner(precision_cbs(mode, max_skips=7) + [InjectInf(every=True)])
    weights = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(RuntimeError, match=r'7 optimizer steps in a row were skipped'):
        learn.fit(1)
    for w, p in zip(weights, learn.model.parameters()): _test_eq(w, p.detach())
    _test_eq(learn.recorder.skipped_steps, list(range(7)))
    learn.remove_cb(InjectInf)
    learn.fit(1)                                                   # the learner is still usable
    assert learn.validate()[1] > 0.8


@pytest.mark.parametrize('mode', ['fp16', 'fp16_classic'])
def test_skips_in_a_row_reset_after_a_clean_step(mode):
    learn = digits_learner(precision_cbs(mode, max_skips=3) + [InjectInf(at=(0, 1, 3, 4, 6, 7))])
    learn.fit(1)
    _test_eq(learn.recorder.skipped_steps, [0, 1, 3, 4, 6, 7])


def test_static_scale_fp16_training():
    cb = FP16Training(loss_scale=128.)
    log = StepLog(cb)
    learn = digits_learner([cb, InjectInf(at=(1,)), log])
    learn.fit_phases([TrainingPhase(iters=4)])
    _test_eq(log.scales, [128.] * 4)
    _test_eq(log.changed, [True, False, True, True])


@pytest.mark.parametrize('growth_interval', [1, 3])
def test_dynamic_rule_matches_torch_grad_scaler(growth_interval):
    "FP16Training's own dynamic scaling and MixedPrecision's GradScaler give the same scales for the same overflows."
    at = (0, 4, 5, 11)
    scales = {}
    for mode in ('fp16', 'fp16_classic'):
        cb = precision_cbs(mode, growth_interval=growth_interval, init_scale=2. ** 4)[0]
        log = StepLog(cb)
        digits_learner([cb, InjectInf(at=at), log]).fit_phases([TrainingPhase(iters=14)])
        scales[mode] = log.scales
    _test_eq(scales['fp16'], scales['fp16_classic'])
    assert len(set(scales['fp16'])) > 2


# ------------------------------------------------------------------------------------------------- master weights

def test_master_weights_fp32_model_fp16_norms_fp32():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.GroupNorm(2, 8),
                          nn.Flatten(), nn.Linear(8 * 64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))
    set_seed(0)
    dls = digits_dls(bs=64, seed=0, flat=False)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), lr=1e-2, metrics=[accuracy],
                    cbs=[Recorder()], default_cbs=False).to_fp16(classic=True)
    cb = learn.fp16_training
    for module in learn.model.modules():
        for p in module.parameters(recurse=False):
            _test_eq(p.dtype, torch.float32 if isinstance(module, norm_types) else torch.float16)
        for b in module.buffers(recurse=False):
            if b.is_floating_point(): _test_eq(b.dtype, torch.float32)   # norm statistics
    assert all(p.dtype == torch.float32 for p in cb.master_model.parameters())
    learn.fit(2)
    _test_eq({id(p) for p in params_of_opt(learn)}, {id(p) for p in cb.master_model.parameters()})
    for p, m in zip(learn.model.parameters(), cb.master_model.parameters()): assert torch.equal(p.detach(), m.detach().to(p.dtype))
    assert learn.validate()[1] > 0.85
    preds, _ = learn.get_preds()
    _test_eq(preds.dtype, torch.float32)


def test_fp16_training_transformer_and_embedding():
    "Token inputs stay integers, LayerNorms inside a TransformerEncoderLayer stay fp32, train and eval both run."
    set_seed(0)
    x = torch.randint(0, 20, (64, 12)); y = (x.sum(1) % 2)
    model = nn.Sequential(nn.Embedding(20, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.),
                          nn.Flatten(), nn.Linear(16 * 12, 2))
    learn = Learner(DataLoaders.from_tensors(x, y, x[:16], y[:16], bs=16), model, loss_func=nn.CrossEntropyLoss(),
                    cbs=[Recorder()], default_cbs=False).to_fp16(classic=True)
    layer = learn.model[1]
    _test_eq((layer.norm1.weight.dtype, layer.linear1.weight.dtype, learn.model[0].weight.dtype),
            (torch.float32, torch.float16, torch.float16))
    learn.fit(2)
    loss = learn.validate()[0]
    assert math.isfinite(loss)


def test_layer_groups_phases_and_optimizer_switch_with_fp16_training():
    learn = digits_learner([FP16Training()], splitter=sequential_splitter)
    cb = learn.fp16_training
    master_ids = {id(p) for p in cb.master_model.parameters()}
    phases = [TrainingPhase(epochs=1, lr=SchedCos(slice(1e-4, 1e-2), slice(1e-5, 1e-3))),
              TrainingPhase(epochs=1, opt_func=torch.optim.SGD, lr=slice(1e-3, 5e-2), mom=0.9)]
    learn.fit_phases(phases)
    assert isinstance(learn.opt.opt, torch.optim.SGD)
    _test_eq({id(p) for p in params_of_opt(learn)}, master_ids)            # the switched optimizer steps the master
    np.testing.assert_allclose(learn.opt.get_hyper('lr'), np.geomspace(1e-3, 5e-2, learn.opt.n_groups))
    assert len(learn.opt.opt.state) > 0                                    # SGD momentum buffers: it did step
    for p, m in zip(learn.model.parameters(), cb.master_model.parameters()): _test_eq(p.detach(), m.detach().to(p.dtype))
    assert learn.validate()[1] > 0.9


@pytest.mark.parametrize('mode', ['bf16', 'fp16'])
def test_layer_groups_and_optimizer_switch_with_mixed_precision(mode):
    learn = digits_learner(precision_cbs(mode), splitter=sequential_splitter)
    learn.fit_phases([TrainingPhase(epochs=1, lr=slice(1e-4, 1e-2)),
                      TrainingPhase(epochs=1, opt_func=torch.optim.SGD, lr=1e-2, mom=0.9)])
    assert isinstance(learn.opt.opt, torch.optim.SGD) and len(learn.opt.opt.state) > 0
    assert learn.validate()[1] > 0.9


def test_freezing_with_fp16_training():
    learn = digits_learner([FP16Training()], splitter=sequential_splitter)
    learn.freeze()                              # everything but the last layer group (norms keep training)
    first = learn.model[0].weight.detach().clone()
    master_first = learn.fp16_training.master_model[0].weight.detach().clone()
    learn.fit(1)
    _test_eq(learn.model[0].weight.detach(), first)
    _test_eq(learn.fp16_training.master_model[0].weight.detach(), master_first)
    assert not learn.model[0].weight.requires_grad and learn.model[1].weight.requires_grad
    learn.unfreeze(); learn.fit(1)
    assert not torch.equal(learn.model[0].weight.detach(), first)


def test_create_opt_after_attaching_is_rebuilt_over_the_master():
    learn = digits_learner([FP16Training()])
    learn.fit(1, reset_opt=True)  # create_opt builds over the fp16 model; before_fit rebuilds it over the master
    _test_eq({id(p) for p in params_of_opt(learn)}, {id(p) for p in learn.fp16_training.master_model.parameters()})
    assert learn.validate()[1] > 0.85


def test_existing_optimizer_state_moves_to_the_master_and_back():
    learn = digits_learner()
    learn.fit(1)
    state = copy.deepcopy(learn.opt.state_dict())
    learn.to_fp16(classic=True)
    moved = learn.opt.state_dict()
    for key, value in state['opt']['state'].items():
        for name, tensor in value.items(): _test_eq(moved['opt']['state'][key][name], tensor)
    _test_eq(moved['opt']['param_groups'], state['opt']['param_groups'])
    learn.fit(1)
    learn.to_fp32()
    assert learn.opt.model is learn.model and all(p.dtype == torch.float32 for p in learn.model.parameters())
    _test_eq({id(p) for p in params_of_opt(learn)}, {id(p) for p in learn.model.parameters()})
    learn.fit(1)
    assert learn.validate()[1] > 0.9


# ------------------------------------------------------------------------------------------------- gradient clipping

class NormLog(Callback):
    order = 100
    def before_fit(self): self.norms = []
    def after_step(self): self.norms.append(self.learn.gradient_clip.last_norm.item())


@pytest.mark.parametrize('mode', MODES)
def test_gradient_clip_sees_unscaled_gradients(mode):
    def norms(mode):
        learn = digits_learner(precision_cbs(mode) + [GradientClip(max_norm=1e3), NormLog()])
        learn.fit_phases([TrainingPhase(iters=5, lr=1e-3)])
        return np.array(learn.norm_log.norms)
    reference, seen = norms('fp32'), norms(mode)
    np.testing.assert_allclose(seen[0], reference[0], rtol=0.02)   # same weights, same batch
    np.testing.assert_allclose(seen, reference, rtol=0.1)          # a scaled norm would be 2**16 times larger


@pytest.mark.parametrize('mode', ['fp32'] + MODES)
def test_gradient_clip_clips_the_step(mode):
    class GradNorm(Callback):
        order = 100
        def before_fit(self): self.norms = []
        def before_step(self):
            grads = [p.grad.flatten().float() for p in params_of_opt(self.learn) if p.grad is not None]
            self.norms.append(torch.cat(grads).norm().item())
    learn = digits_learner(precision_cbs(mode) + [GradientClip(max_norm=0.05), GradNorm()])
    learn.fit_phases([TrainingPhase(iters=4)])
    np.testing.assert_allclose(learn.grad_norm.norms, 0.05, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ save, load, state

def test_save_writes_fp32_master_weights_and_load_restores_them(tmp_path):
    learn = digits_learner([FP16Training()], path=tmp_path)
    learn.fit(1)
    master = {k: v.detach().clone() for k, v in learn.fp16_training.master_model.named_parameters()}
    file = learn.save('half', with_opt=True)
    saved = torch.load(file, weights_only=True)
    for k, v in saved['model'].items():
        if v.is_floating_point(): _test_eq(v.dtype, torch.float32)
        if k in master: _test_eq(v, master[k])
    expected = learn.validate()
    fresh = digits_learner([FP16Training()], path=tmp_path).load('half')
    for k, v in fresh.fp16_training.master_model.named_parameters(): _test_eq(v.detach(), master[k])
    np.testing.assert_allclose(fresh.validate(), expected, rtol=1e-6)
    fresh.fit(1)
    assert fresh.opt.model is fresh.fp16_training.master_model
    plain = digits_learner(path=tmp_path).load('half')                   # an fp32 learner reads it as is
    for k, v in plain.model.named_parameters(): _test_eq(v.detach(), master[k])


def _create_opt_uses_opt_model() -> bool:
    import inspect
    return 'opt_model' in inspect.getsource(Learner.create_opt)


@pytest.mark.xfail(not _create_opt_uses_opt_model(), strict=False,
                   reason="Learner.create_opt builds over learn.model (fp16), so optimizer state loaded before the first "
                          "fit is cast to fp16; needs create_opt to build over learn.opt_model (see the report)")
def test_load_with_opt_before_any_fit_keeps_fp32_optimizer_state(tmp_path):
    learn = digits_learner([FP16Training()], path=tmp_path)
    learn.fit(1)
    learn.save('half', with_opt=True)
    fresh = digits_learner([FP16Training()], path=tmp_path).load('half')
    assert fresh.opt.model is fresh.fp16_training.master_model
    saved, loaded = learn.opt.state_dict()['opt']['state'], fresh.opt.state_dict()['opt']['state']
    for key, value in saved.items():
        for name, tensor in value.items(): _test_eq(loaded[key][name], tensor)


def test_model_state_dict_of_a_deepcopy_is_not_hijacked():
    learn = digits_learner([FP16Training()])
    twin = copy.deepcopy(learn.model)
    with torch.no_grad(): twin[0].weight.zero_()
    _test_eq(twin.state_dict()['0.weight'].abs().sum().item(), 0.)
    assert learn.model.state_dict()['0.weight'].abs().sum().item() > 0


@pytest.mark.parametrize('mode', ['fp16', 'fp16_classic'])
def test_callback_state_dict_carries_the_scale(mode):
    cb = precision_cbs(mode, growth_interval=1000)[0]
    learn = digits_learner([cb, InjectInf(at=(0, 1))])
    learn.fit_phases([TrainingPhase(iters=3)])
    state = cb.state_dict()
    _test_eq(cb.scale, 2. ** 14)
    buffer = io.BytesIO(); torch.save(state, buffer); buffer.seek(0)
    state = torch.load(buffer, weights_only=True)                   # plain types only
    other = precision_cbs(mode)[0]
    other.load_state_dict(state)
    _test_eq(other.scale, 2. ** 14)
    learn2 = digits_learner([other])
    learn2.fit_phases([TrainingPhase(iters=1)])
    _test_eq(other.scale, 2. ** 14)


def _lr_find_available():
    try: import phaselearn.lr_finder  # noqa: F401
    except ImportError: return False
    return hasattr(Learner, 'lr_find')


@pytest.mark.skipif(not _lr_find_available(), reason="phaselearn.lr_finder not there yet")
@pytest.mark.parametrize('mode', ['bf16', 'fp16', 'fp16_classic'])
def test_lr_find_restores_weights_master_and_scale(mode):
    import phaselearn.lr_finder  # noqa: F401
    learn = digits_learner(precision_cbs(mode))
    learn.fit(1)
    cb = _precision_cbs(learn)[0]
    state = copy.deepcopy(learn.model.state_dict())
    master = None if mode != 'fp16_classic' else copy.deepcopy(learn.fp16_training.master_model.state_dict())
    opt_state, scale = copy.deepcopy(learn.opt.state_dict()), cb.scale
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.lr_find(num_it=40, show_plot=False)
    for k, v in learn.model.state_dict().items(): _test_eq(v, state[k])
    if master is not None:
        for k, v in learn.fp16_training.master_model.named_parameters(): _test_eq(v.detach(), master[k])
        assert learn.opt.model is learn.fp16_training.master_model
    _test_eq(cb.scale, scale)
    after = learn.opt.state_dict()
    _test_eq(after['opt']['param_groups'], opt_state['opt']['param_groups'])
    learn.fit(1)
    assert learn.validate()[1] > 0.9


def test_temporary_fp16_training_leaves_fp32_behind():
    learn = digits_learner()
    learn.fit(1, cbs=[FP16Training()])
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert learn.opt.model is learn.model and not _precision_cbs(learn)
    learn.fit(1)
    assert learn.validate()[1] > 0.9


def test_compiled_model_with_fp16_training(tmp_path):
    learn = digits_learner(path=tmp_path)
    learn.model = torch.compile(learn.model, backend='eager')
    learn.to_fp16(classic=True)
    learn.fit(1)
    saved = torch.load(learn.save('compiled'), weights_only=True)['model']
    assert not any(k.startswith('_orig_mod') for k in saved)
    master = dict(learn.fp16_training.master_model.named_parameters())
    for k, v in master.items(): _test_eq(saved[k], v.detach())


# ----------------------------------------------------------------------------------------------------- LSTM probe

def _autocast_lstm_runs(dtype) -> bool:
    "Whether this CPU's oneDNN runs nn.LSTM under autocast to `dtype` (some refuse float16, some bfloat16 too)."
    try:
        with torch.autocast('cpu', dtype=dtype): nn.LSTM(4, 4, batch_first=True)(torch.randn(2, 3, 4))
        return True
    except RuntimeError: return False


class LastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, 32, batch_first=True), nn.Linear(32, 10)
    def forward(self, x): return self.head(self.lstm(x.view(-1, 8, 8))[0][:, -1])


@pytest.mark.parametrize('mode', MODES)
def test_lstm(mode):
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(mode)
    if dtype is not None and not _autocast_lstm_runs(dtype):
        pytest.skip(f"this CPU's oneDNN refuses nn.LSTM under {dtype} autocast (a known torch limit, probed); "
                    "FP16Training covers LSTMs here")
    learn = digits_learner(precision_cbs(mode), model=LastStep())
    learn.fit(2)
    assert learn.validate()[1] > 0.5


# ------------------------------------------------------------------------------------------------------ host syncs

class ItemCounter:
    "Counts `Tensor.item`/`__bool__`/`__float__` calls made from the mixed-precision module while active."
    def __enter__(self):
        self.count, self.saved = 0, {}
        for name in ('item', '__bool__', '__float__'):
            original = self.saved[name] = getattr(torch.Tensor, name)
            def wrapper(t, *args, _original=original, **kwargs):
                if sys._getframe(1).f_code.co_filename.replace('\\', '/').endswith('phaselearn/mixed_precision.py'):
                    self.count += 1
                return _original(t, *args, **kwargs)
            setattr(torch.Tensor, name, wrapper)
        return self
    def __exit__(self, *exc):
        for name, original in self.saved.items(): setattr(torch.Tensor, name, original)


@pytest.mark.parametrize('mode,per_step', [('bf16', 0), ('fp16', 1), ('fp16_classic', 1)])
def test_host_syncs(mode, per_step):
    learn = digits_learner(precision_cbs(mode))
    learn.fit(1)
    with ItemCounter() as counter: learn.fit(2)
    _test_eq(counter.count, per_step * 2 * len(learn.dls.train))


# ----------------------------------------------------------------------------------------------------- bad input

def test_bad_input():
    for dtype in (torch.int8, torch.float64, torch.float32, 'fp16'):
        with pytest.raises(ValueError, match='torch.float16 or torch.bfloat16'): MixedPrecision(dtype)
    for bad in (0, -2., float('inf'), float('nan'), 'static', None):
        with pytest.raises(ValueError, match="'dynamic' or a positive finite number"): FP16Training(loss_scale=bad)
    with pytest.raises(ValueError, match='init_scale'): FP16Training(init_scale=0)
    with pytest.raises(ValueError, match='max_skips'): FP16Training(max_skips=-1)
    with pytest.raises(ValueError, match='max_norm'): GradientClip(max_norm=float('inf'))
    with pytest.raises(ValueError, match='norm_type'): GradientClip(1., norm_type=0)
    no_floats = Learner(digits_dls(), nn.Flatten(), loss_func=nn.CrossEntropyLoss(), cbs=[], default_cbs=False)
    for make in (lambda: no_floats.to_fp16(), lambda: no_floats.to_bf16(), lambda: no_floats.to_fp16(classic=True),
                 lambda: no_floats.add_cb(FP16Training())):
        with pytest.raises(ValueError, match='no floating-point parameters'): make()
    half_model = digits_learner([MixedPrecision()], model=mlp().half())
    with pytest.raises(ValueError, match='use FP16Training'): half_model.fit(1)


# ----------------------------------------------------------------------------------------------------------- GPU

def _cuda_syncs(learn, n_epoch) -> int:
    "Synchronising CUDA calls during `learn.fit(n_epoch)`, as CUDA's sync debug mode reports them."
    return len(cuda_sync_warnings(lambda: learn.fit(n_epoch)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize('mode', MODES)
def test_cuda_accuracy_and_syncs(mode, fp32_accuracy):
    learn = digits_learner(precision_cbs(mode), device='cuda')
    learn.fit_one_cycle(5, lr_max=1e-2)
    assert abs(learn.validate()[1] - fp32_accuracy) <= 0.02
    reference = digits_learner(device='cuda')
    reference.fit(1)
    extra = _cuda_syncs(learn, 2) - _cuda_syncs(reference, 2)   # beyond the default loop's few per epoch
    n_steps = 2 * len(learn.dls.train)
    if mode == 'bf16': assert extra <= 2, extra
    else: assert n_steps - 2 <= extra <= n_steps + 2, (extra, n_steps)   # the one overflow read per step
