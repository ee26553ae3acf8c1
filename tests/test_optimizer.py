"Reference tests for phaselearn.optimizer: OptimWrapper against torch optimizers driven directly and hand computations."
import io, math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from phaselearn.all import *

N_STEPS = 60


def make_model(seed=0):
    "Three top-level children with parameters (the middle one holds a BatchNorm) and a parameter-free ReLU: 8 parameters."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Sequential(nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 8)), nn.ReLU(),
                         nn.Linear(8, 3))


def batches(n=N_STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def loss_step(model, xb, yb):
    nn.functional.mse_loss(model(xb), yb).backward()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def exempt_ids(model, bn_wd=False, bias_wd=False):
    "Ids of the parameters exempt from decay, found independently of the wrapper: norm layers' and biases."
    norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    bias = {id(m.bias) for m in model.modules() if getattr(m, 'bias', None) is not None}
    return (set() if bn_wd else norm) | (set() if bias_wd else bias)


def reference_groups(wrapper, wrapper_model, ref_model, l2_wd=0., bn_wd=False, bias_wd=False):
    "Torch param groups over `ref_model`, per layer group of `wrapper` a decayed (weight_decay `l2_wd`) and an exempt group."
    index = {id(p): i for i, p in enumerate(wrapper_model.parameters())}
    exempt = exempt_ids(wrapper_model, bn_wd, bias_wd)
    ref_params = list(ref_model.parameters())
    groups = []
    for layer, params in enumerate(wrapper.layer_groups):
        for decays in (True, False):
            half = [ref_params[index[id(p)]] for p in params if (id(p) not in exempt) == decays]
            if half: groups.append({'params': half, 'layer': layer, 'weight_decay': l2_wd if decays else 0., 'decays': decays})
    return groups


LR_MULTS = [0.1, 0.3, 1.0]   # one per layer group (sequential_splitter on make_model: 6 torch param groups)


def schedule(t, base_lr):
    "Per-step lr for each layer group and one momentum, changed every step as a schedule would."
    lr = base_lr * (0.55 + 0.45 * math.cos(math.pi * t / N_STEPS))
    return [lr * m for m in LR_MULTS], 0.95 - 0.1 * t / N_STEPS


CASES = {
    'Adam':         (torch.optim.Adam, 1e-2, 0., False),
    'Adam-L2':      (torch.optim.Adam, 1e-2, 0.05, False),
    'AdamW-inner':  (torch.optim.AdamW, 1e-2, 0.05, False),
    'NAdam':        (torch.optim.NAdam, 1e-2, 0., False),
    'SGD-mom':      (partial(torch.optim.SGD, momentum=0.9), 5e-2, 0.01, False),
    'SGD-nesterov': (partial(torch.optim.SGD, momentum=0.9, nesterov=True), 5e-2, 0.01, False),
    'RMSprop':      (partial(torch.optim.RMSprop, momentum=0.5), 1e-3, 0.01, False),
}


@pytest.mark.parametrize('case', list(CASES))
def test_unified_names_drive_torch_exactly(case):
    "lr per layer group and mom (plus sqr_mom where it exists) set every step equal the torch optimizer driven by hand."
    opt_func, base_lr, wd, true_wd = CASES[case]
    model, ref_model = make_model(), make_model()
    opt = OptimWrapper(model, opt_func, splitter=sequential_splitter, lr=base_lr, wd=wd, true_wd=true_wd)
    assert opt.n_groups == 3 and len(opt.param_groups) == 6
    ref_groups = reference_groups(opt, model, ref_model, l2_wd=wd)
    for g in ref_groups: g.pop('decays')
    ref = opt_func(ref_groups)
    has_sqr = 'sqr_mom' in opt.hyper_names
    for t, (xb, yb) in enumerate(batches()):
        lrs, mom = schedule(t, base_lr)
        sqr_mom = 0.999 - 0.01 * t / N_STEPS
        opt.set_hyper('lr', lrs); opt.set_hyper('mom', mom)
        if has_sqr: opt.set_hyper('sqr_mom', sqr_mom)
        for g in ref.param_groups:
            g['lr'] = lrs[g['layer']]
            if 'betas' in g: g['betas'] = (mom, sqr_mom)
            else:
                g['momentum'] = mom
                if 'alpha' in g: g['alpha'] = sqr_mom
        loss_step(model, xb, yb); opt.step(); opt.zero_grad()
        loss_step(ref_model, xb, yb); ref.step(); ref.zero_grad()
    assert not torch.equal(flat(model), flat(make_model()))
    torch.testing.assert_close(flat(model), flat(ref_model), atol=1e-6, rtol=0)


@pytest.mark.parametrize('bn_bias_wd', [True, False])
def test_decoupled_adam_equals_adamw(bn_bias_wd):
    "Adam + true_wd equals torch AdamW driven by hand, with lr and wd changing every step."
    model, ref_model = make_model(), make_model()
    opt = OptimWrapper(model, torch.optim.Adam, splitter=sequential_splitter, lr=1e-2, wd=0.1, true_wd=True,
                       bn_wd=bn_bias_wd, bias_wd=bn_bias_wd)
    assert all(g['weight_decay'] == 0 for g in opt.param_groups)
    assert len(opt.param_groups) == opt.n_groups == 3   # decoupled decay: one torch group per layer group
    groups = reference_groups(opt, model, ref_model, bn_wd=bn_bias_wd, bias_wd=bn_bias_wd)
    decays = [g.pop('decays') for g in groups]
    assert len(groups) == (3 if bn_bias_wd else 6)
    ref = torch.optim.AdamW(groups)
    for t, (xb, yb) in enumerate(batches()):
        lrs, _ = schedule(t, 1e-2)
        wd = 0.1 + 0.2 * t / N_STEPS
        opt.set_hypers(lr=lrs, wd=wd)
        for g, d in zip(ref.param_groups, decays):
            g['lr'], g['weight_decay'] = lrs[g['layer']], wd if d else 0.
        loss_step(model, xb, yb); opt.step(); opt.zero_grad()
        loss_step(ref_model, xb, yb); ref.step(); ref.zero_grad()
    torch.testing.assert_close(flat(model), flat(ref_model), atol=1e-6, rtol=0)


@pytest.mark.parametrize('true_wd', [True, False])
def test_one_sgd_step_by_hand(true_wd):
    "Decoupled: p*(1 - lr*wd) - lr*g; L2: p - lr*(g + wd*p); per layer group lr and wd; exempt params get lr*g only."
    model = make_model()
    opt = OptimWrapper(model, torch.optim.SGD, splitter=sequential_splitter, true_wd=true_wd)
    lrs, wds = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    opt.set_hypers(lr=lrs, wd=wds)
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = batches(1)[0]
    loss_step(model, xb, yb)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    layer = {id(p): i for i, g in enumerate(opt.layer_groups) for p in g}
    exempt = exempt_ids(model)
    assert len(exempt) == 5   # three biases and the BatchNorm weight and bias
    assert len(opt.param_groups) == (3 if true_wd else 6)
    for p, p0, g in zip(model.parameters(), before, grads):
        lr, wd = lrs[layer[id(p)]], wds[layer[id(p)]]
        if id(p) in exempt: expected = p0 - lr * g
        elif true_wd: expected = p0 * (1 - lr * wd) - lr * g
        else: expected = p0 - lr * (g + wd * p0)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def norm_model():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.LayerNorm(6), nn.GroupNorm(2, 6),
                         nn.Linear(6, 6, bias=False), *([nn.RMSNorm(6)] if hasattr(nn, 'RMSNorm') else []))


@pytest.mark.parametrize('true_wd', [True, False])
@pytest.mark.parametrize('bn_wd,bias_wd', [(False, False), (True, False), (False, True), (True, True)])
def test_exempt_params_get_no_decay(true_wd, bn_wd, bias_wd):
    "Zero gradients, SGD: a decayed parameter shrinks by 1 - lr*wd, an exempt one does not move at all."
    model = norm_model()
    opt = OptimWrapper(model, torch.optim.SGD, lr=0.1, wd=0.5, true_wd=true_wd, bn_wd=bn_wd, bias_wd=bias_wd)
    opt.set_hyper('wd', 0.5)   # setting wd again keeps exempt groups at 0
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    bias_ids = {id(m.bias) for m in model.modules() if getattr(m, 'bias', None) is not None}
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters(): p.grad = torch.zeros_like(p)
    opt.step()
    for p, p0 in zip(model.parameters(), before):
        exempt = (id(p) in norm_ids and not bn_wd) or (id(p) in bias_ids and not bias_wd)
        torch.testing.assert_close(p.detach(), p0 if exempt else p0 * (1 - 0.1 * 0.5), atol=1e-7, rtol=0)
    for h, g, d in zip(opt.hypers, opt.param_groups, opt._decays):
        assert h['wd'] == (0.5 if d else 0.)
        if not d: assert g['weight_decay'] == 0 and g.get('decoupled_wd', 0.) == 0


def test_decay_skips_params_without_grad():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    opt = OptimWrapper(model, torch.optim.SGD, lr=0.1, wd=0.5)
    w0, w1 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    model[1].weight.grad = torch.zeros(3, 3)
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w0, atol=0, rtol=0)
    torch.testing.assert_close(model[1].weight.detach(), w1 * 0.95)


def frozen_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8)), nn.Linear(8, 8), nn.Linear(8, 3))


@pytest.mark.parametrize('train_bn', [True, False])
def test_frozen_groups_do_not_move(train_bn):
    "After some unfrozen Adam steps (moments exist), frozen groups stay put; BatchNorm trains only when train_bn."
    model = frozen_model()
    opt = OptimWrapper(model, torch.optim.Adam, splitter=sequential_splitter, lr=1e-2, wd=0.1, train_bn=train_bn)
    data = batches(10)
    for xb, yb in data[:5]: loss_step(model, xb, yb); opt.step(); opt.zero_grad()
    loss_step(model, *data[5])   # stale gradients present when freezing
    opt.freeze()
    assert opt.frozen_idx == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for xb, yb in data[5:]: loss_step(model, xb, yb); opt.step(); opt.zero_grad()
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        if n.startswith('2.'): assert moved, n
        elif n.startswith('0.1.'): assert moved == train_bn, n
        else: assert not moved, n
    opt.freeze_to(-3); assert opt.frozen_idx == 0
    opt.freeze_to(1); assert [p.requires_grad for p in model[1].parameters()] == [True, True]
    opt.unfreeze(); assert all(p.requires_grad for p in model.parameters())


def assert_plain(obj):
    "Only tensors and plain Python types."
    if isinstance(obj, dict):
        for k, v in obj.items(): assert_plain(k); assert_plain(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj: assert_plain(v)
    else: assert obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str)), type(obj)


@pytest.mark.parametrize('opt_func', [torch.optim.Adam, partial(torch.optim.SGD, momentum=0.9), torch.optim.RMSprop])
@pytest.mark.parametrize('true_wd', [True, False])
def test_state_dict_round_trip(opt_func, true_wd):
    "Save mid-training, load into a fresh model and wrapper (weights_only), continue: same as uninterrupted."
    def fresh(): 
        model = frozen_model()
        return model, OptimWrapper(model, opt_func, splitter=sequential_splitter, true_wd=true_wd)
    def run(model, opt, data, t0):
        for t, (xb, yb) in enumerate(data, t0):
            lrs, mom = schedule(t, 1e-2)
            opt.set_hyper('lr', lrs); opt.set_hyper('mom', mom)
            loss_step(model, xb, yb); opt.step(); opt.zero_grad()
    data = batches(20)
    model, opt = fresh()
    opt.set_hypers(wd=[0.1, 0.2, 0.3], eps=1e-6) if 'eps' in opt.hyper_names else opt.set_hyper('wd', [0.1, 0.2, 0.3])
    opt.freeze_to(1)
    run(model, opt, data[:10], 0)
    sd = opt.state_dict()
    assert_plain(sd)
    buf = io.BytesIO(); torch.save({'model': model.state_dict(), 'opt': sd}, buf)
    run(model, opt, data[10:], 10)
    model2, opt2 = fresh()
    buf.seek(0); saved = torch.load(buf, weights_only=True)
    model2.load_state_dict(saved['model']); opt2.load_state_dict(saved['opt'])
    assert opt2.frozen_idx == 1 and opt2.get_hyper('wd') == [0.1, 0.2, 0.3]
    assert [p.requires_grad for p in model2[0][0].parameters()] == [False, False]
    run(model2, opt2, data[10:], 10)
    torch.testing.assert_close(flat(model2), flat(model), atol=0, rtol=0)


def test_load_state_dict_mismatch_errors():
    model, sd = frozen_model(), None
    sd = OptimWrapper(model, torch.optim.Adam, splitter=sequential_splitter).state_dict()
    with pytest.raises(ValueError, match=r'3 layer group\(s\), this wrapper has 1'):
        OptimWrapper(frozen_model(), torch.optim.Adam).load_state_dict(sd)
    with pytest.raises(ValueError, match='true_wd=True, this wrapper has true_wd=False'):
        OptimWrapper(frozen_model(), torch.optim.Adam, splitter=sequential_splitter, true_wd=False).load_state_dict(sd)
    with pytest.raises(ValueError, match=r'decays \[1, 1, 1\] parameters per param group, this wrapper \[2, 2, 2\]'):
        OptimWrapper(frozen_model(), torch.optim.Adam, splitter=sequential_splitter, bias_wd=True).load_state_dict(sd)
    l2 = OptimWrapper(frozen_model(), torch.optim.Adam, splitter=sequential_splitter, true_wd=False).state_dict()
    with pytest.raises(ValueError, match=r'6 param group\(s\), this wrapper has 4'):
        OptimWrapper(frozen_model(), torch.optim.Adam, splitter=sequential_splitter, true_wd=False, bias_wd=True).load_state_dict(l2)
    with pytest.raises(ValueError, match='not an OptimWrapper state dict'):
        OptimWrapper(frozen_model(), torch.optim.Adam).load_state_dict({'weights': 1})


def fused_cpu_supported():
    try:
        p = nn.Parameter(torch.zeros(2)); p.grad = torch.ones(2)
        torch.optim.Adam([p], fused=True).step(); return True
    except (RuntimeError, ValueError): return False


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('true_wd', [True, False])
def test_foreach_and_fused_adam(impl, true_wd):
    "foreach=True and fused=True Adam under the wrapper match the single-tensor implementation."
    if impl == 'fused' and not fused_cpu_supported(): pytest.skip('fused Adam not supported on this CPU build')
    def run(**kwargs):
        model = make_model()
        opt = OptimWrapper(model, partial(torch.optim.Adam, **kwargs), splitter=sequential_splitter, lr=1e-2, wd=0.05,
                           true_wd=true_wd)
        for t, (xb, yb) in enumerate(batches(30)):
            lrs, mom = schedule(t, 1e-2)
            opt.set_hypers(lr=lrs, mom=mom)
            loss_step(model, xb, yb); opt.step(); opt.zero_grad()
        return flat(model)
    torch.testing.assert_close(run(**{impl: True}), run(foreach=False), atol=1e-6, rtol=0)


def test_switch_carries_hypers_and_starts_fresh():
    model = make_model()
    adam = OptimWrapper(model, partial(torch.optim.Adam, eps=1e-5), splitter=sequential_splitter, lr=1e-2, wd=0.1)
    adam.set_hypers(lr=[1e-3, 2e-3, 3e-3], mom=0.8, sqr_mom=0.95)
    adam.freeze_to(1)
    for xb, yb in batches(3): loss_step(model, xb, yb); adam.step(); adam.zero_grad()
    rms = adam.switch(torch.optim.RMSprop)
    assert rms.model is model and rms.frozen_idx == 1 and len(rms.opt.state) == 0
    assert rms.layer_groups == adam.layer_groups
    for name in ('lr', 'mom', 'sqr_mom', 'eps', 'wd'): assert rms.get_hyper(name) == adam.get_hyper(name), name
    assert [h['wd'] for h in rms.hypers] == [h['wd'] for h in adam.hypers]
    sgd = rms.switch(torch.optim.SGD)
    assert sgd.hyper_names[:3] == ['lr', 'mom', 'wd'] and sgd.get_hyper('mom') == [0.8] * 3
    for xb, yb in batches(3): loss_step(model, xb, yb); sgd.step(); sgd.zero_grad()
    assert len(sgd.opt.state) > 0


def test_unified_names_other_optimizers_and_native_keys():
    for opt_func in (torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax, torch.optim.AdamW):
        opt = OptimWrapper(make_model(), opt_func)
        opt.set_hypers(mom=0.7, sqr_mom=0.9)
        assert all(g['betas'] == (0.7, 0.9) for g in opt.param_groups)
    rms = OptimWrapper(make_model(), torch.optim.RMSprop)
    rms.set_hypers(mom=0.7, sqr_mom=0.9)
    assert all((g['momentum'], g['alpha']) == (0.7, 0.9) for g in rms.param_groups)
    ada = OptimWrapper(make_model(), torch.optim.Adadelta, splitter=sequential_splitter)
    ada.set_hyper('rho', [0.8, 0.85, 0.9]); assert ada.get_hyper('rho') == [0.8, 0.85, 0.9]
    adagrad = OptimWrapper(make_model(), torch.optim.Adagrad)
    adagrad.set_hyper('lr_decay', 0.01); assert adagrad.get_hyper('lr_decay') == [0.01]
    sgd = OptimWrapper(make_model(), partial(torch.optim.SGD, momentum=0.9))
    sgd.set_hyper('nesterov', True); assert all(g['nesterov'] for g in sgd.param_groups)


def test_user_opt_func_arguments_stand():
    opt = OptimWrapper(make_model(), partial(torch.optim.Adam, betas=(0.5, 0.6), eps=1e-3, weight_decay=0.3), lr=2e-3)
    assert opt.hypers[0] == dict(lr=2e-3, mom=0.5, sqr_mom=0.6, eps=1e-3, wd=0.)
    assert all(g['weight_decay'] == 0 for g in opt.param_groups)   # wd is set explicitly (0 here)


def test_scalar_types_and_spreads():
    opt = OptimWrapper(make_model(), torch.optim.Adam, splitter=sequential_splitter)
    for value in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), 0.25):
        opt.set_hyper('lr', value); assert opt.get_hyper('lr') == [0.25] * 3 and type(opt.get_hyper('lr')[0]) is float
    opt.set_hyper('lr', 1); assert opt.get_hyper('lr') == [1] * 3
    opt.set_hyper('lr', slice(1e-4, 1e-2)); np.testing.assert_allclose(opt.get_hyper('lr'), [1e-4, 1e-3, 1e-2])
    opt.set_hyper('lr', slice(1e-2)); np.testing.assert_allclose(opt.get_hyper('lr'), [1e-3, 1e-3, 1e-2])
    opt.set_hyper('lr', torch.tensor([1., 2., 3.])); assert opt.get_hyper('lr') == [1., 2., 3.]
    opt.set_hyper('mom', (0.7, 0.8, 0.9)); assert opt.get_hyper('mom') == [0.7, 0.8, 0.9]
    one = OptimWrapper(make_model(), torch.optim.Adam, lr=slice(1e-4, 1e-2))
    assert one.get_hyper('lr') == [1e-2]


def test_bad_inputs():
    model = make_model()
    sgd = OptimWrapper(model, torch.optim.SGD, splitter=sequential_splitter)
    with pytest.raises(ValueError, match=r"SGD has no 'sqr_mom'.*valid names: lr, mom, wd"): sgd.check_hyper('sqr_mom')
    with pytest.raises(ValueError, match=r"SGD has no 'sqr_mom'"): sgd.set_hyper('sqr_mom', 0.99)
    with pytest.raises(ValueError, match=r"SGD has no 'eps'"): sgd.get_hyper('eps')
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'learning_rate'.*valid names: lr"): sgd.set_hyper('learning_rate', 1.)
    with pytest.raises(ValueError, match="unified name 'wd'"): sgd.set_hyper('weight_decay', 0.1)
    with pytest.raises(ValueError, match=r'got 2 values but the optimizer has 3 layer group'): sgd.set_hyper('lr', [1e-3, 1e-2])
    with pytest.raises(ValueError, match=r'got 4 values but the optimizer has 3 layer group'): sgd.set_hyper('wd', np.zeros(4))
    for name in ('lr', 'wd'):
        for bad in (float('nan'), -1e-3, float('inf'), np.float32('nan'), [1e-3, float('nan'), 1e-3], slice(-1., 1.)):
            with pytest.raises(ValueError, match=f'({name} must be a finite number >= 0|> 0)'): sgd.set_hyper(name, bad)
    with pytest.raises(ValueError, match=r'slice\(lo, hi\)'): sgd.set_hyper('lr', slice(1e-3, None))
    with pytest.raises(ValueError, match=r'slice\(lo, hi\)'): sgd.set_hyper('lr', slice(1e-3, 1e-2, 2))
    with pytest.raises(ValueError, match='lr must be'): OptimWrapper(make_model(), torch.optim.SGD, lr=-1.)
    lbfgs = lambda params, **kwargs: torch.optim.LBFGS([p for g in params for p in g['params']], **kwargs)
    with pytest.raises(ValueError, match=r'LBFGS has no weight_decay.*true_wd=True'):
        OptimWrapper(nn.Linear(2, 2, bias=False), lbfgs, wd=0.1, true_wd=False)
    OptimWrapper(nn.Linear(2, 2, bias=False), lbfgs, wd=0.1, true_wd=True)      # decoupled decay works with any optimizer
    with pytest.raises(ValueError, match=r'misses 4 of the model.s 8 parameters'):
        OptimWrapper(model, splitter=lambda m: [list(m[0].parameters()), list(m[1][1].parameters())])
    with pytest.raises(ValueError, match=r'lists 2 parameter\(s\) more than once'):
        OptimWrapper(model, splitter=lambda m: [list(m.parameters()), list(m[0].parameters())])
    with pytest.raises(ValueError, match='not in the model'):
        OptimWrapper(model, splitter=lambda m: [list(m.parameters()), [nn.Parameter(torch.zeros(1))]])
    with pytest.raises(ValueError, match='at least 2 top-level children'): body_head_splitter(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r'valid values are -3\.\.3'): sgd.freeze_to(-4)
    with pytest.raises(TypeError, match='integer'): sgd.freeze_to(1.5)
    assert sgd.get_hyper('lr') == [1e-3] * 3   # nothing above changed the optimizer


def test_splitters():
    model = make_model()
    assert [len(g) for g in default_splitter(model)] == [8]
    assert [len(g) for g in sequential_splitter(model)] == [2, 4, 2]
    body, head = body_head_splitter(model)
    assert len(body) == 6 and head == list(model[3].parameters())
    opt = OptimWrapper(model, torch.optim.Adam, splitter=body_head_splitter, lr=slice(1e-4, 1e-2))
    assert opt.n_groups == 2 and opt.get_hyper('lr') == [1e-4, 1e-2]
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert len(OptimWrapper(tied, torch.optim.SGD).layer_groups[0]) == 1      # a tied weight is one parameter
    with pytest.raises(ValueError, match=r'lists 1 parameter\(s\) more than once'):
        OptimWrapper(tied, torch.optim.SGD, splitter=body_head_splitter)


# ---- hyperparameter scales ----

@pytest.mark.parametrize('case', ['Adam', 'SGD-mom'])
def test_scaled_schedule_drives_torch_exactly(case):
    "A schedule set every step, scaled twice on the way (per layer group the second time), equals torch driven with schedule x scale."
    opt_func, base_lr, wd, true_wd = CASES[case]
    model, ref_model = make_model(), make_model()
    opt = OptimWrapper(model, opt_func, splitter=sequential_splitter, lr=base_lr, wd=wd, true_wd=true_wd)
    ref_groups = reference_groups(opt, model, ref_model, l2_wd=wd)
    for g in ref_groups: g.pop('decays')
    ref = opt_func(ref_groups)
    scale = [1., 1., 1.]
    for t, (xb, yb) in enumerate(batches()):
        if t == 20: opt.scale_hyper('lr', 0.1); scale = [0.1] * 3
        if t == 40: opt.scale_hyper('lr', [1., 0.5, 0.25]); scale = [0.1, 0.05, 0.025]
        lrs, mom = schedule(t, base_lr)
        opt.set_hyper('lr', lrs); opt.set_hyper('mom', mom)
        for g in ref.param_groups:
            g['lr'] = lrs[g['layer']] * scale[g['layer']]
            if 'betas' in g: g['betas'] = (mom, g['betas'][1])
            else: g['momentum'] = mom
        loss_step(model, xb, yb); opt.step(); opt.zero_grad()
        loss_step(ref_model, xb, yb); ref.step(); ref.zero_grad()
    torch.testing.assert_close(flat(model), flat(ref_model), atol=1e-6, rtol=0)
    assert opt.hyper_scales == {'lr': pytest.approx([0.1, 0.05, 0.025])}


def test_scales_resume_exactly():
    "Save a scaled wrapper mid-run (weights_only), load into a fresh one, continue the schedule: same weights as uninterrupted."
    def fresh():
        model = make_model()
        return model, OptimWrapper(model, torch.optim.Adam, splitter=sequential_splitter, lr=1e-2)
    def run(model, opt, data, t0):
        for t, (xb, yb) in enumerate(data, t0):
            opt.set_hyper('lr', schedule(t, 1e-2)[0]); loss_step(model, xb, yb); opt.step(); opt.zero_grad()
    data = batches(20)
    model, opt = fresh()
    run(model, opt, data[:5], 0); opt.scale_hyper('lr', 0.3); run(model, opt, data[5:10], 5)
    buf = io.BytesIO(); torch.save({'model': model.state_dict(), 'opt': opt.state_dict()}, buf)
    run(model, opt, data[10:], 10)
    model2, opt2 = fresh()
    buf.seek(0); saved = torch.load(buf, weights_only=True)
    model2.load_state_dict(saved['model']); opt2.load_state_dict(saved['opt'])
    assert opt2.hyper_scales == {'lr': [0.3] * 3}
    run(model2, opt2, data[10:], 10)
    torch.testing.assert_close(flat(model2), flat(model), atol=0, rtol=0)


def test_scales_reset_and_switch():
    model = make_model()
    opt = OptimWrapper(model, torch.optim.Adam, splitter=sequential_splitter, lr=1e-2, wd=0.1)
    opt.set_hyper('lr', [1e-3, 2e-3, 3e-3])
    opt.scale_hyper('lr', 0.1); opt.scale_hyper('lr', 0.5)
    assert opt.get_hyper('lr') == pytest.approx([5e-5, 1e-4, 1.5e-4])
    sgd = opt.switch(torch.optim.SGD)
    assert sgd.hyper_scales == {'lr': pytest.approx([0.05] * 3)}
    sgd.set_hyper('lr', 1.); assert sgd.get_hyper('lr') == pytest.approx([0.05] * 3)
    sgd.reset_scales('lr'); assert sgd.get_hyper('lr') == [1.] * 3 and sgd.hyper_scales == {}
    opt.reset_scales(); assert opt.get_hyper('lr') == [1e-3, 2e-3, 3e-3]   # exact: the unscaled values are kept
    opt.reset_scales('lr')                                                  # nothing to reset: no error
    with pytest.raises(ValueError, match='finite number > 0'): opt.scale_hyper('lr', -1.)
    with pytest.raises(ValueError, match='valid names'): opt.scale_hyper('momentum', 0.5)
