"""The peers' schedulers against phaselearn's built-ins, value by value.

Convention mapping. A torch scheduler gives the lr of optimizer step `k` (0-based) after `k` calls of `scheduler.step()`;
phaselearn gives step `k` of a phase of `n` steps the value at `pct = k / n`, which a schedule with `total=n` reads as
`t = k` units. So "torch's lr before step k" == `sched(k / n)`. Hugging Face's schedules are `LambdaLR` factors of the
same step counter (`lr = base_lr * lr_lambda(k)`); Keras' `LearningRateSchedule(step)` and Composer's schedulers take the
same 0-based step. Peers that count from 1 (Vaswani et al.) or hit both ends (nanoGPT's warm-up, `(it + 1) / (W + 1)`)
are mapped where they are tested. Formulas of peers that are not installed here (Hugging Face, Keras, Composer, ignite)
are written out from their documentation, re-derived, not copied.
"""
import math
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L
from phaselearn.all import *


def torch_lrs(make, n: int, base_lrs=(0.1,)) -> np.ndarray:
    "The lr of each param group before each of `n` optimizer steps, under the scheduler `make(opt)`: shape (n, groups)."
    opt = torch.optim.SGD([{'params': [torch.zeros(1, requires_grad=True)], 'lr': lr} for lr in base_lrs], lr=base_lrs[0],
                          momentum=0.9)
    sched, out = make(opt), []
    for _ in range(n):
        out.append([g['lr'] for g in opt.param_groups])
        opt.step(); sched.step()
    return np.array(out)


def ours(sched, n: int) -> np.ndarray:
    "`sched` at steps `0 .. n-1` of a phase of `n` steps, shape (n, groups)."
    return np.asarray(sched.values(n), dtype=float).reshape(n, -1)


BASE = (0.1, 0.03)   # two layer groups: each schedule takes per-group values


@pytest.mark.parametrize('n', [20, 97])
def test_step_lr(n):
    expected = torch_lrs(lambda o: L.StepLR(o, step_size=7, gamma=0.5), n, BASE)
    np.testing.assert_allclose(ours(SchedStep(list(BASE), 7, 0.5, total=n), n), expected, rtol=1e-13)  # torch multiplies step by step


@pytest.mark.parametrize('n', [30, 101])
def test_multistep_lr_with_a_repeated_milestone(n):
    expected = torch_lrs(lambda o: L.MultiStepLR(o, milestones=[5, 12, 12, 29], gamma=0.3), n, BASE)
    np.testing.assert_allclose(ours(SchedMultiStep(list(BASE), [5, 12, 12, 29], 0.3, total=n), n), expected, rtol=1e-13)


def test_exponential_lr():
    n = 50
    expected = torch_lrs(lambda o: L.ExponentialLR(o, gamma=0.93), n, BASE)
    np.testing.assert_allclose(ours(SchedExpDecay(list(BASE), 0.93, total=n), n), expected, rtol=1e-12)


@pytest.mark.parametrize('power', [1., 2., 0.5])
def test_polynomial_lr_decays_to_zero_and_holds(power):
    n = 25   # torch's PolynomialLR(total_iters=15) holds at 0 after step 15
    expected = torch_lrs(lambda o: L.PolynomialLR(o, total_iters=15, power=power), n, BASE)
    np.testing.assert_allclose(ours(SchedPolyDecay(list(BASE), 0., power, period=15, total=n), n), expected, rtol=1e-12, atol=1e-17)


@pytest.mark.parametrize('mode', ['triangular', 'triangular2', 'exp_range'])
def test_cyclic_lr_bit_for_bit(mode):
    n = 60
    expected = torch_lrs(lambda o: L.CyclicLR(o, base_lr=[1e-3, 2e-4], max_lr=[1e-2, 5e-3], step_size_up=4, step_size_down=7,
                                               mode=mode, gamma=0.97, cycle_momentum=False), n, BASE)
    got = ours(SchedCyclic([1e-3, 2e-4], [1e-2, 5e-3], step_up=4, step_down=7, mode=mode, gamma=0.97, total=n), n)
    np.testing.assert_array_equal(got, expected)   # the same arithmetic as torch's get_lr


@pytest.mark.parametrize('t_mult', [1, 2, 3])
def test_cosine_annealing_warm_restarts_bit_for_bit(t_mult):
    n = 80
    expected = torch_lrs(lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=t_mult, eta_min=1e-4), n, BASE)
    got = ours(SchedCosRestarts(list(BASE), 1e-4, period=5, period_mult=t_mult, total=n), n)
    np.testing.assert_array_equal(got, expected)


def ignite_cosine(n, start, end, cycle_size, cycle_mult, start_value_mult, end_value_mult=1.):
    "ignite's CosineAnnealingScheduler as its docs define it: cycle restarts when the event index reaches the cycle size, "
    "then `cycle_size = int(cycle_size * cycle_mult)`, `start_value *= start_value_mult`, `end_value *= end_value_mult`."
    out, idx = [], 0
    for _ in range(n):
        if idx != 0 and idx % cycle_size == 0:
            idx, cycle_size, start, end = 0, int(cycle_size * cycle_mult), start * start_value_mult, end * end_value_mult
        out.append(start + (end - start) / 2 * (1 - math.cos(math.pi * idx / cycle_size)))
        idx += 1
    return np.array(out)


def test_ignite_cosine_with_fractional_cycle_mult_and_peak_mult():
    n = 200
    expected = ignite_cosine(n, 0.1, 1e-3, 20, 1.3, 0.7)
    sched = SchedCosRestarts(0.1, 1e-3, period=20, period_mult=1.3, peak_mult=0.7, total=n)
    assert sched.cycle_lengths == [20, 26, 33, 42, 54, 70]
    np.testing.assert_allclose(ours(sched, n)[:, 0], expected, rtol=1e-12, atol=1e-16)
    expected = ignite_cosine(n, 0.1, 1e-2, 20, 1.3, 0.7, end_value_mult=0.5)
    sched = SchedCosRestarts(0.1, 1e-2, period=20, period_mult=1.3, peak_mult=0.7, end_mult=0.5, total=n)
    np.testing.assert_allclose(ours(sched, n)[:, 0], expected, rtol=1e-12, atol=1e-16)


def composer_cosine_restarts(n, t_0, t_mult, alpha_f):
    "Composer's CosineAnnealingWarmRestartsScheduler (a factor of the base lr): intervals `t_0`, then each `int(t_mult * previous)`; "
    "within one, `alpha_f + (1 - alpha_f) * (1 + cos(pi * tau)) / 2`, tau the fraction of the interval done."
    out = []
    for t in range(n):
        length, end = t_0, t_0
        while end <= t: length = int(t_mult * length); end += length
        tau = (t - (end - length)) / length
        out.append(alpha_f + (1 - alpha_f) * (1 + math.cos(math.pi * tau)) / 2)
    return np.array(out)


def test_composer_cosine_warm_restarts():
    n, lr = 150, 0.1
    expected = lr * composer_cosine_restarts(n, 10, 1.5, 0.05)
    sched = SchedCosRestarts(lr, lr * 0.05, period=10, period_mult=1.5, total=n)
    assert sched.cycle_lengths == [10, 15, 22, 33, 49, 73]
    np.testing.assert_allclose(ours(sched, n)[:, 0], expected, rtol=1e-12)


def test_keras_exponential_decay_staircase_and_smooth():
    "Keras ExponentialDecay: initial * rate ** (step / decay_steps), the exponent floored with staircase=True."
    n = 100
    for staircase in (False, True):
        expected = [0.1 * 0.96 ** (math.floor(k / 15) if staircase else k / 15) for k in range(n)]
        np.testing.assert_allclose(ours(SchedExpDecay(0.1, 0.96, period=15, staircase=staircase, total=n), n)[:, 0], expected, rtol=1e-13)


@pytest.mark.parametrize('cycle', [False, True])
def test_keras_polynomial_decay(cycle):
    "Keras PolynomialDecay(initial, decay_steps, end, power, cycle): (initial - end) * (1 - step / decay_steps) ** power + end, "
    "step held at decay_steps, or with cycle decay_steps stretched to decay_steps * ceil(step / decay_steps) (1 at step 0)."
    n, d = 70, 20
    def keras(step):
        if cycle: ds = d * max(1, math.ceil(step / d))
        else: ds, step = d, min(step, d)
        return (0.1 - 1e-3) * (1 - step / ds) ** 2. + 1e-3
    got = ours(SchedPolyDecay(0.1, 1e-3, 2., period=d, cycle=cycle, total=n), n)[:, 0]
    np.testing.assert_array_equal(got, [keras(k) for k in range(n)])


def test_keras_cosine_decay_restarts_without_alpha():
    "Keras CosineDecayRestarts(initial, first_decay_steps, t_mul, m_mul, alpha=0): period first_decay_steps * t_mul**i, "
    "peak initial * m_mul**i (whole t_mul: no truncation question)."
    n, first = 150, 10
    def keras(step):
        i, start, length = 0, 0, first
        while step >= start + length: start, length, i = start + length, length * 2, i + 1
        return 0.1 * 0.5 * 0.6 ** i * (1 + math.cos(math.pi * (step - start) / length))
    got = ours(SchedCosRestarts(0.1, 0., period=first, period_mult=2, peak_mult=0.6, total=n), n)[:, 0]
    np.testing.assert_allclose(got, [keras(k) for k in range(n)], rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize('staircase', [False, True])
def test_keras_inverse_time_decay(staircase):
    "Keras InverseTimeDecay: initial / (1 + decay_rate * step / decay_steps), the ratio floored with staircase=True."
    n = 80
    expected = [0.1 / (1 + 0.5 * (math.floor(k / 12) if staircase else k / 12)) for k in range(n)]
    np.testing.assert_allclose(ours(SchedInvTime(0.1, 0.5, period=12, staircase=staircase, total=n), n)[:, 0], expected, rtol=1e-14)


def test_ignite_linear_cyclical():
    "ignite LinearCyclicalScheduler(start, end, cycle_size): end + (start - end) * |progress - 0.5| * 2 within each cycle."
    n, size = 90, 20
    expected = [0.1 + (0.01 - 0.1) * abs((k % size) / size - 0.5) * 2 for k in range(n)]
    np.testing.assert_allclose(ours(SchedCyclic(0.01, 0.1, step_up=size / 2, total=n), n)[:, 0], expected, rtol=1e-13)


def ignite_linear_cyclical(n, start, end, cycle_size, cycle_mult):
    "ignite's LinearCyclicalScheduler as its docs define it: end + (start - end) * |progress - 0.5| * 2, progress the event "
    "index over the cycle size; at the cycle's end the index restarts and `cycle_size = int(cycle_size * cycle_mult)`."
    out, idx = [], 0
    for _ in range(n):
        if idx != 0 and idx % cycle_size == 0: idx, cycle_size = 0, int(cycle_size * cycle_mult)
        out.append(end + (start - end) * abs(idx / cycle_size - 0.5) * 2)
        idx += 1
    return np.array(out)


@pytest.mark.parametrize('cycle_mult', [1.5, 2, 1.3])
def test_ignite_linear_cyclical_with_cycle_mult(cycle_mult):
    n, size = 120, 20
    sched = SchedCyclic(0.01, 0.1, step_up=size / 2, cycle_mult=cycle_mult, total=n)
    np.testing.assert_allclose(ours(sched, n)[:, 0], ignite_linear_cyclical(n, 0.01, 0.1, size, cycle_mult), rtol=1e-13)


def test_hugging_face_inverse_sqrt():
    "HF get_inverse_sqrt_schedule: step / max(1, warmup) during warm-up, then 1 / sqrt((step + timescale - warmup) / timescale)."
    n, w = 300, 40
    for timescale in (None, 100):
        ts = w if timescale is None else timescale
        expected = [0.1 * (k / w if k < w else 1.0 / math.sqrt((k + ts - w) / ts)) for k in range(n)]
        np.testing.assert_allclose(ours(SchedInvSqrt(0.1, w, timescale=timescale, total=n), n)[:, 0], expected, rtol=1e-14)


def test_hugging_face_polynomial_decay_with_warmup():
    "HF get_polynomial_decay_schedule_with_warmup(warmup, total, lr_end, power): a linear warm-up from 0, then "
    "(lr_init - lr_end) * (1 - (step - warmup) / (total - warmup)) ** power + lr_end: phases of `steps=`."
    w, total, lr, lr_end, power = 10, 60, 0.1, 1e-3, 2.
    def hf(step):
        if step < w: return lr * step / w
        return (lr - lr_end) * (1 - (step - w) / (total - w)) ** power + lr_end
    preview = Phases([TrainingPhase(steps=w, lr=SchedLin(0., lr)),
                      TrainingPhase(steps=total - w, lr=SchedPolyDecay(lr, lr_end, power))]).preview(7)
    np.testing.assert_allclose(preview['lr'][:, 0], [hf(k) for k in range(total)], rtol=1e-13)


@pytest.mark.parametrize('warmup', ['linear', 'cosine', '1-sqrt'])
@pytest.mark.parametrize('decay', ['linear', 'cosine', '1-sqrt'])
def test_hugging_face_wsd(decay, warmup):
    "HF get_wsd_schedule(warmup, decay, stable, warmup_type, decay_type, min_lr_ratio): factor min + (1 - min) * f(progress), "
    "f the warm-up's p, (1 - cos(pi p)) / 2 or 1 - sqrt(1 - p), then 1, then 1 - p, (1 + cos(pi p)) / 2 or 1 - sqrt(p)."
    w, s, d, lr, m = 10, 50, 40, 0.1, 0.05
    def hf(step):
        if step < w:
            p = step / w
            f = {'linear': p, 'cosine': 0.5 * (1 - math.cos(math.pi * p)), '1-sqrt': 1 - math.sqrt(1 - p)}[warmup]
            return m + (1 - m) * f
        if step < w + s: return 1.
        p = (step - w - s) / d
        f = {'linear': 1 - p, 'cosine': 0.5 * (1 + math.cos(math.pi * p)), '1-sqrt': 1 - math.sqrt(p)}[decay]
        return m + (1 - m) * f
    n = w + s + d
    sched = SchedWSD(lr, warmup=w, decay=d, end=lr * m, start=lr * m, decay_shape=decay, warmup_shape=warmup, total=n)
    np.testing.assert_allclose(ours(sched, n)[:, 0], [lr * hf(k) for k in range(n)], rtol=1e-13)


def test_hugging_face_cosine_with_hard_restarts():
    "HF get_cosine_with_hard_restarts_schedule_with_warmup(warmup, total, num_cycles): after the warm-up, "
    "0.5 * (1 + cos(pi * ((num_cycles * progress) % 1)))."
    w, total, cycles, lr = 10, 100, 3, 0.1
    def hf(step):
        if step < w: return lr * step / w
        progress = (step - w) / (total - w)
        return lr * 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    preview = Phases([TrainingPhase(steps=w, lr=SchedLin(0., lr)),
                      TrainingPhase(steps=total - w, lr=SchedCosRestarts(lr, 0., period=(total - w) // cycles, total=total - w))]).preview(13)
    np.testing.assert_allclose(preview['lr'][:, 0], [hf(k) for k in range(total)], rtol=1e-12, atol=1e-18)


def test_hugging_face_cosine_with_a_horizon_longer_than_the_run():
    "HF get_cosine_schedule_with_warmup(num_training_steps=1000) in a run stopped at 600 steps: SchedWindow."
    horizon, run, lr = 1000, 600, 0.1
    expected = [lr * 0.5 * (1 + math.cos(math.pi * k / horizon)) for k in range(run)]
    np.testing.assert_allclose(ours(SchedWindow(SchedCos(lr, 0.), end=run / horizon), run)[:, 0], expected, rtol=1e-12, atol=1e-18)


def test_lambda_lr_any_callable():
    "torch's LambdaLR is any callable of the step: in phaselearn, any callable of pct (here: the step is pct * n)."
    n = 30
    f = lambda step: 1 / (1 + 0.1 * step)
    expected = torch_lrs(lambda o: L.LambdaLR(o, f), n)
    np.testing.assert_allclose(Phases([TrainingPhase(steps=n, lr=lambda p: 0.1 * f(round(p * n)))]).preview(n)['lr'], expected, rtol=1e-15)


def test_vaswani_counts_from_one():
    "Vaswani et al.: lrate = d**-0.5 * min(step_num**-0.5, step_num * warmup**-1.5), step_num from 1: position t = step_num."
    d, w, n = 512, 400, 2000
    sched = SchedInvSqrt((d * w) ** -0.5, warmup=w, total=n)
    np.testing.assert_allclose([sched(s / n) for s in range(1, n)], [d ** -0.5 * min(s ** -0.5, s * w ** -1.5) for s in range(1, n)], rtol=1e-12)


@pytest.mark.parametrize('make', [lambda lo, hi: SchedStep(slice(lo, hi), 3, 0.5, total=10),
                                  lambda lo, hi: SchedCyclic(slice(lo / 10, hi / 10), slice(lo, hi), 2, total=10),
                                  lambda lo, hi: SchedCosRestarts(slice(lo, hi), 0., period=4, period_mult=2, total=10),
                                  lambda lo, hi: SchedWSD(slice(lo, hi), 0.2, 0.3, decay_shape='1-sqrt'),
                                  lambda lo, hi: SchedPolyDecay(slice(lo, hi), 0., 2., period=5, cycle=True, total=10)])
def test_slices_schedule_both_ends(make):
    "A slice schedules its two ends by the same rule: each end is the schedule of that end alone."
    lo, hi = 1e-4, 1e-2
    both, low, high = make(lo, hi), make(lo, lo), make(hi, hi)
    for k in range(10):
        v = both(k / 10)
        assert math.isclose(v.start, low(k / 10).stop, rel_tol=1e-12) and math.isclose(v.stop, high(k / 10).stop, rel_tol=1e-12)


@pytest.mark.parametrize('sched', [SchedStep(0.1, 3, total=10), SchedMultiStep(0.1, [0.5]), SchedExpDecay(0.1, 0.5),
                                   SchedInvSqrt(0.1, 0.1), SchedInvTime(0.1, 2.), SchedPolyDecay(0.1), SchedCyclic(0.01, 0.1, 0.25),
                                   SchedCosRestarts(0.1, period=0.3, period_mult=2), SchedWSD(0.1, 0.1, 0.2),
                                   SchedSqrtDecay(0.1, 0.), SchedWindow(SchedCos(0.1, 0.), 0.2, 0.5)])
def test_every_builtin_has_a_readable_repr_a_plot_and_a_cheap_call(sched):
    import timeit
    assert repr(sched).startswith(type(sched).__name__ + '(') and 'object at' not in repr(sched)
    ax = sched.plot(); assert len(ax.lines) == 1
    import matplotlib.pyplot as plt; plt.close('all')
    per_call = min(timeit.repeat(lambda: sched(0.37), number=2000, repeat=3)) / 2000
    assert per_call < 2e-5, per_call   # a per-batch call stays in microseconds (flat: no loop over the phase)
