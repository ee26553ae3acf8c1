"Reference and property tests for phaselearn.schedule (torch's schedulers and hand computations as references)."
import copy, math
import numpy as np
import pytest
import torch
from phaselearn.all import *

def _ulp_tol(a, b): return 1e-12 * max(abs(a), abs(b))

@pytest.mark.parametrize('n', [1, 2, 7, 10, 100, 1000])
@pytest.mark.parametrize('start,end', [(1e-2, 1e-5), (0.1, 0.), (1e-3, 5e-3)])
def test_cos_matches_torch_cosine_annealing(n, start, end):
    "lr at step i of CosineAnnealingLR(T_max=n, eta_min=end) with base lr start == SchedCos(start, end)(i/n)."
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=start)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n, eta_min=end)
    sched = SchedCos(start, end)
    for i in range(n + 1):
        lr = opt.param_groups[0]['lr']
        assert math.isclose(sched(i / n), lr, rel_tol=1e-9, abs_tol=1e-15), (i, n, sched(i / n), lr)
        opt.step(); torch_sched.step()
    np.testing.assert_allclose(sched.values(n), [start + (1 + math.cos(math.pi * (1 - i / n))) * (end - start) / 2
                                                 for i in range(n)], rtol=1e-12, atol=1e-15 * start)

@pytest.mark.parametrize('n', [3, 50])
def test_lin_matches_torch_linear_lr(n):
    "LinearLR(start_factor=a, end_factor=b, total_iters=n) on base lr 1 is SchedLin(a, b)."
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.)
    torch_sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=0.9, total_iters=n)
    sched = SchedLin(0.1, 0.9)
    for i in range(n + 1):
        assert math.isclose(sched(i / n), opt.param_groups[0]['lr'], rel_tol=1e-9)
        opt.step(); torch_sched.step()

def test_exp_matches_geomspace():
    np.testing.assert_allclose(SchedExp(1e-7, 10.).values(100), np.geomspace(1e-7, 10., 101)[:-1], rtol=1e-12)

def test_warmup_then_cosine_matches_hand_computation():
    warm, lr_max, lr_end = 0.1, 3e-3, 3e-7
    sched = combine_scheds([warm, 1 - warm], [SchedLin(lr_max / 25, lr_max), SchedCos(lr_max, lr_end)])
    def hand(p):
        if p < warm: return lr_max / 25 + p / warm * (lr_max - lr_max / 25)
        q = (p - warm) / (1 - warm)
        return lr_end + (lr_max - lr_end) * (1 + math.cos(math.pi * q)) / 2
    n = 200
    np.testing.assert_allclose(sched.values(n), [hand(i / n) for i in range(n)], rtol=1e-9)
    assert sched(warm) == lr_max and sched(0.) == lr_max / 25 and sched(1.) == lr_end
    assert sched(warm - 1e-6) < lr_max

def test_combine_boundaries_use_later_schedule():
    pcts = [0.1, 0.2, 0.3, 0.4]
    sched = combine_scheds(pcts, [SchedLin(k, k + 1) for k in range(4)])
    bounds = np.cumsum([0.] + pcts)[:-1]
    for k, b in enumerate(bounds): assert sched(float(b)) == k  # local pct 0 of piece k
    for n in (10, 20, 100):  # i/n on a boundary always starts the later piece, whatever the float rounding of the sums
        vals = sched.values(n)
        for k, b in enumerate(bounds): assert vals[round(b * n)] == k
    assert sched(1.) == 4

ENDS = [(1e-2, 1e-5), (1e-5, 1e-2), (0.95, 0.85), (3., 3.), (-1., 2.), (0.123456789, 987.654321)]
KINDS = [SchedLin, SchedCos, lambda s, e: SchedPoly(s, e, 0.5), lambda s, e: SchedPoly(s, e, 3)]

@pytest.mark.parametrize('start,end', ENDS)
@pytest.mark.parametrize('make', KINDS + [SchedExp])
def test_endpoints_exact_and_monotonic(make, start, end):
    if make is SchedExp and (start <= 0 or end <= 0): pytest.skip('SchedExp needs positive ends')
    sched = make(start, end)
    assert sched(0.) == start and sched(1.) == end and sched(0) == start and sched(1) == end
    vals = np.array([sched(i / 997) for i in range(998)])
    diffs = np.diff(vals) * np.sign(end - start) if end != start else np.diff(vals)
    assert (diffs >= -4 * np.spacing(max(abs(start), abs(end)))).all()  # monotonic, up to rounding
    if start == end: assert (vals == start).all()
    assert vals.min() >= min(start, end) and vals.max() <= max(start, end)

def test_cos_symmetry():
    sched = SchedCos(1., 0.)
    for p in np.linspace(0, 1, 21): assert math.isclose(sched(float(p)) + sched(float(1 - p)), 1., rel_tol=1e-12)

@pytest.mark.parametrize('make', KINDS + [SchedExp])
def test_arrays_schedule_each_group(make):
    starts, ends = [1e-4, 1e-3, 1e-2], [1e-6, 1e-5, 1e-1]
    sched = make(starts, ends)
    vals = sched.values(13)
    assert vals.shape == (13, 3)
    for j in range(3): np.testing.assert_allclose(vals[:, j], make(starts[j], ends[j]).values(13), rtol=1e-12)
    np.testing.assert_array_equal(sched(0.), starts); np.testing.assert_array_equal(sched(1.), ends)
    np.testing.assert_array_equal(make(np.array(starts), 1e-6)(1.), [1e-6] * 3)  # a number is used for every group

@pytest.mark.parametrize('make', KINDS + [SchedExp])
def test_slices_schedule_both_ends(make):
    sched = make(slice(1e-5, 1e-3), slice(1e-6, 1e-2))
    lo, hi = make(1e-5, 1e-6), make(1e-3, 1e-2)
    for p in (0., 0.2, 0.5, 0.77, 1.):
        v = sched(p)
        assert isinstance(v, slice) and v.step is None
        assert math.isclose(v.start, lo(p), rel_tol=1e-12) and math.isclose(v.stop, hi(p), rel_tol=1e-12)
        assert type(v.start) is float and type(v.stop) is float
    assert make(slice(1e-2), 1e-4)(0.3) == slice(None, make(1e-2, 1e-4)(0.3))
    assert make(1e-4, slice(1e-3, 1e-2))(0.) == slice(1e-4, 1e-4)

@pytest.mark.parametrize('bad', [slice(1, 2, 3), slice(1, None), 'x', float('nan'), [], [[1, 2]], None])
def test_bad_ends_raise(bad):
    with pytest.raises(ValueError): SchedLin(bad, 1.)

def test_mismatched_ends_raise():
    with pytest.raises(ValueError, match='same length'): SchedCos([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match='cannot be mixed'): SchedCos(slice(1, 2), [1, 2])
    with pytest.raises(ValueError, match='> 0'): SchedExp(0., 1.)
    with pytest.raises(ValueError, match='> 0'): SchedExp(slice(1e-3, -1.), 1.)

@pytest.mark.parametrize('sched', [SchedLin(0, 1), SchedCos(1, 0), SchedExp(1, 2), SchedPoly(0, 1, 2), SchedConst(1),
                                   SchedNo(1, 2), combine_scheds([0.5, 0.5], [SchedLin(0, 1), SchedCos(1, 0)])])
@pytest.mark.parametrize('pct', [1.5, -0.1, 1 + 1e-6, float('nan'), float('inf'), '0.5', None, True, torch.tensor(0.5)])
def test_pct_out_of_range_raises(sched, pct):
    with pytest.raises(ValueError, match=r'\[0, 1\]'): sched(pct)

def test_pct_rounding_noise_is_clamped():
    sched = SchedExp(1e-3, 1.)
    assert sched(1 + 1e-12) == 1. and sched(-1e-12) == 1e-3
    assert sched(np.float32(0.5)) == sched(0.5) and sched(np.float64(0.25)) == sched(0.25)

def test_combine_scheds_errors():
    with pytest.raises(ValueError, match='sum to 1'): combine_scheds([0.3, 0.3], [SchedConst(1), SchedConst(2)])
    with pytest.raises(ValueError, match='one fraction per schedule'): combine_scheds([0.5, 0.5], [SchedConst(1)])
    with pytest.raises(ValueError, match='one fraction per schedule'): combine_scheds([], [])
    with pytest.raises(ValueError, match=r'in \[0, 1\]'): combine_scheds([1.2, -0.2], [SchedConst(1), SchedConst(2)])

def test_repr_and_copy():
    assert repr(SchedCos(0.01, 1e-05)) == 'SchedCos(start=0.01, end=1e-05)'
    scheds = [SchedLin(1e-4, 1e-2), SchedExp([1e-3, 1e-2], 1.), SchedPoly(slice(1e-3), 0., 2), SchedConst(slice(1, 2)),
              combine_scheds([0.25, 0.75], [SchedLin(0, 1), SchedCos(1, 0)])]
    for s in scheds:
        c = copy.deepcopy(s)
        assert repr(c) == repr(s)
        for p in (0., 0.3, 1.):
            a, b = s(p), c(p)
            if isinstance(a, np.ndarray): np.testing.assert_array_equal(a, b)
            else: assert a == b

def test_plot_returns_axes():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ax = SchedCos([1e-3, 1e-2], 0.).plot(n=50)
    assert len(ax.lines) == 2 and len(ax.lines[0].get_xdata()) == 50
    np.testing.assert_allclose(ax.lines[1].get_ydata()[[0, -1]], [1e-2, 0.])
    fig, ax0 = plt.subplots()
    assert SchedLin(slice(1e-2), 0.).plot(ax=ax0) is ax0 and len(ax0.lines) == 1
    plt.close('all')
