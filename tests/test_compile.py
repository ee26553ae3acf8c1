"""`Learner.compile`: a compiled fit against an eager one, recompiles over a schedule, and the features that must keep
working with a compiled model and step (save/load, lr_find, checkpoints and resume, mixed precision).

Backends 'eager' and 'aot_eager' trace with dynamo (and AOTAutograd) but generate no code, so these run on any machine."""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from phaselearn.all import *


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def digits_learner(opt_func=torch.optim.Adam, wd=0., true_wd=True, cbs=(), path='.'):
    set_seed(0)
    # no bias before the BatchNorm: its gradient would be rounding noise (BN removes it), and Adam's update of a
    # parameter with a gradient of 1e-9 depends on the order of float operations, compiled or not
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    learn = Learner(digits_dls(bs=64, seed=0), model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, lr=1e-2,
                    wd=wd, true_wd=true_wd, metrics=[accuracy], cbs=list(cbs), path=path)
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


def weights(learn): return [p.detach().clone() for p in unwrap_model(learn.model).parameters()]


def assert_weights_close(a, b, atol=1e-5):
    for x, y in zip(a, b): torch.testing.assert_close(x, y, atol=atol, rtol=0)


class CountCompiles(Callback):
    "The backend's count of compiled graphs after every epoch."
    def __init__(self, counter): self.counter, self.counts = counter, []
    def after_epoch(self): self.counts.append(self.counter.frame_count)


OPTIMIZERS = {
    'Adam-decoupled-wd': (torch.optim.Adam, 0.01, True),
    'AdamW-L2-wd': (torch.optim.AdamW, 0.01, False),
    'SGD-momentum': (lambda params: torch.optim.SGD(params, momentum=0.9), 0.01, True),
}


@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_compiled_fit_matches_eager(name):
    "Model (aot_eager: forward and backward traced) and step compiled: the weights of an eager fit_one_cycle."
    opt_func, wd, true_wd = OPTIMIZERS[name]
    eager = digits_learner(opt_func, wd, true_wd)
    eager.fit_one_cycle(2)
    compiled = digits_learner(opt_func, wd, true_wd).compile(step=True, backend='aot_eager')
    compiled.fit_one_cycle(2)
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert not torch.equal(weights(eager)[0], weights(digits_learner())[0])  # it trained
    assert_weights_close(weights(compiled), weights(eager))
    np_lr = compiled.recorder.hyper('lr')
    torch.testing.assert_close(torch.tensor(np_lr), torch.tensor(eager.recorder.hyper('lr')))
    assert all(type(g['lr']) is float for g in compiled.opt.param_groups)   # floats outside the step


def test_recompiles_constant_over_fit_one_cycle():
    "Model and step: every graph is compiled in the first epoch; lr and mom change every batch and nothing recompiles."
    counter = CountCompiles(CompileCounterWithBackend('eager'))
    learn = digits_learner().compile(step=True, backend=counter.counter)
    learn.fit_one_cycle(4, cbs=[counter])
    assert counter.counts[0] > 0 and len(set(counter.counts)) == 1, counter.counts


@pytest.mark.parametrize('dynamic', [None, False])
def test_step_compiles_once_with_tensors_not_with_floats(dynamic):
    "The step alone: one graph with lr/betas held in tensors; held as floats, more (up to the recompile limit with dynamic=False)."
    counts = {}
    for keys in (('lr', 'betas', 'momentum'), ()):
        torch._dynamo.reset()
        counter = CountCompiles(CompileCounterWithBackend('eager'))
        learn = digits_learner().compile(model=False, step=True, keys=keys, backend=counter.counter, dynamic=dynamic)
        learn.fit_one_cycle(2, cbs=[counter])
        counts[keys] = counter.counts
    assert counts[('lr', 'betas', 'momentum')] == [1, 1]
    assert counts[()][-1] >= (8 if dynamic is False else 2), counts


def test_switching_optimizer_compiles_the_new_one():
    "A phase that switches to SGD: the compiled step follows learn.opt; removing the callback restores the eager step."
    phases = [TrainingPhase(epochs=1, lr=SchedCos(1e-2, 1e-3)), TrainingPhase(epochs=1, opt_func=torch.optim.AdamW, lr=1e-3)]
    eager = digits_learner(); eager.fit_phases(phases)
    compiled = digits_learner().compile(model=False, step=True, backend='eager'); compiled.fit_phases(phases)
    assert isinstance(compiled.opt.opt, torch.optim.AdamW) and 'step' in vars(compiled.opt.opt)
    assert_weights_close(weights(compiled), weights(eager))
    compiled.compile(model=False, step=False)
    assert 'step' not in vars(compiled.opt.opt)


def test_save_load_between_compiled_and_eager(tmp_path):
    "Files hold the original module's state_dict (no _orig_mod. prefix): load either way, optimizer state included."
    compiled = digits_learner(path=tmp_path).compile(step=True, backend='eager')
    compiled.fit_one_cycle(1)
    file = compiled.save('compiled', with_opt=True)
    state = torch.load(file, weights_only=True)
    assert not any(k.startswith('_orig_mod') for k in state['model'])
    eager = digits_learner(path=tmp_path).load('compiled')
    assert_weights_close(weights(eager), weights(compiled), atol=0)
    assert eager.opt.state_dict()['opt']['state'].keys() == compiled.opt.state_dict()['opt']['state'].keys()
    again = digits_learner(path=tmp_path).compile(step=True, backend='eager').load('compiled')
    assert_weights_close(weights(again), weights(compiled), atol=0)
    # and training goes on identically from the loaded files
    eager.fit(1); again.fit(1)
    assert_weights_close(weights(again), weights(eager))


def test_lr_find_on_compiled_learner():
    "lr_find sweeps a compiled model and step (lr changing every batch) and puts everything back."
    learn = digits_learner().compile(step=True, backend='eager')
    learn.fit(1)
    before = weights(learn)
    suggestions = learn.lr_find(num_it=30, show_plot=False)
    assert all(0 < v < 10 for v in suggestions)
    assert_weights_close(weights(learn), before, atol=0)
    learn.fit(1)   # still trains afterwards
    assert not torch.equal(weights(learn)[0], before[0])


class StopAt(Callback):
    order = 100
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.training and self.learn.train_iter == self.at: raise KeyboardInterrupt


def test_checkpoint_resume_compiled(tmp_path):
    "Interrupted compiled fit, resumed by a fresh compiled learner from its checkpoint: the uninterrupted run's weights."
    reference = digits_learner(path=tmp_path).compile(step=True, backend='eager')
    reference.fit_one_cycle(3)
    learn = digits_learner(path=tmp_path, cbs=[CheckpointCallback(every_iters=10)]).compile(step=True, backend='eager')
    with pytest.raises(KeyboardInterrupt): learn.fit_one_cycle(3, cbs=[StopAt(35)])
    resumed = digits_learner(path=tmp_path).compile(step=True, backend='eager')
    for p in resumed.model.parameters(): nn.init.normal_(p)
    resumed.fit_one_cycle(3, resume='checkpoint')
    assert_weights_close(weights(resumed), weights(reference), atol=1e-6)


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_compiled(precision):
    "Autocast (and fp16's loss scaling) with a compiled model and step: close to the same eager fit, loss finite."
    def make():
        learn = digits_learner()
        return learn.to_bf16() if precision == 'bf16' else learn.to_fp16()
    eager = make(); eager.fit_one_cycle(2)
    compiled = make().compile(step=True, backend='aot_eager'); compiled.fit_one_cycle(2)
    assert all(torch.isfinite(torch.tensor(row[1:-1])).all() for row in compiled.recorder.values)
    # half precision rounds differently once the graphs differ: a few weights drift apart, the model does not
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(weights(compiled), weights(eager))])
    assert diffs.max() < 0.15 and diffs.mean() < 2e-3, (diffs.max(), diffs.mean())
    assert abs(compiled.recorder.values[-1][3] - eager.recorder.values[-1][3]) < 0.03   # accuracy
