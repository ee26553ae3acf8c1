"""Models as users bring them (issue 18): Hugging Face transformers built from tiny configs (random weights, nothing
downloaded) trained straight from dict batches with no wrapper and no loss_func; a nanoGPT-style recipe against a
hand-written loop of the same recipe; the decay rule on norm classes torch does not know; exact means without targets.

Run alone: `python -m pytest -q tests/test_hf.py`. The kill -9 resume test runs this file as a worker process:
    python tests/test_hf.py kill FOLDER AT     # SIGKILL after training batch AT
"""
import copy, math, os, signal, subprocess, sys, warnings
from functools import partial
from pathlib import Path
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from phaselearn.all import *

transformers = pytest.importorskip('transformers') if __name__ != '__main__' else __import__('transformers')
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)
transformers.utils.logging.set_verbosity_error()

V, T = 32, 8   # vocabulary, sequence length


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models on a shared machine: one thread is faster than several fighting for the cores (restored after)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0., embd_pdrop=0., attn_pdrop=0.))


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=T, num_labels=3, pad_token_id=0))


def lm_samples(n, seed, labels=True):
    "Dicts as a tokenizer and a collator would give them: input_ids, attention_mask and (for a causal LM) labels."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, T), generator=g)
    ids[:, 1::2] = ids[:, ::2] % 7 + 1                      # something learnable: every odd token follows the one before
    return [dict(input_ids=ids[i], attention_mask=torch.ones(T, dtype=torch.long), **({'labels': ids[i]} if labels else {}))
            for i in range(n)]


def cls_samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, T), generator=g)
    return [dict(input_ids=ids[i], attention_mask=torch.ones(T, dtype=torch.long), labels=ids[i, 0] % 3) for i in range(n)]


def hf_learner(model, samples=lm_samples, n_train=16, n_valid=20, bs=8, **kwargs):
    dls = DataLoaders.from_datasets(samples(n_train, 1), samples(n_valid, 2), bs=bs, valid_bs=bs, seed=0)
    learn = Learner(dls, model, device='cpu', **kwargs)   # no loss_func: the model computes its own loss from labels
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


def own_losses(model, dl):
    "The model's own loss of each validation batch, and the batch sizes, by hand."
    model.eval()
    with torch.no_grad(): return [(model(**b).loss.item(), len(b['input_ids'])) for b in dl]


# ---- items 2, 3: dict batches, the model's own loss, fit_one_cycle / validate / lr_find ----

@pytest.mark.parametrize('make', [gpt2, llama, bert], ids=['gpt2', 'llama', 'bert'])
def test_hf_model_trains_from_dict_batches(make):
    "No wrapper, no loss_func: model(**batch), the loss is the output's; valid_loss is the exact mean of the model's own losses."
    model = make()
    learn = hf_learner(model, cls_samples if make is bert else lm_samples, metrics=[accuracy] if make is bert else None)
    before = copy.deepcopy(model.state_dict())
    learn.fit_one_cycle(1, lr_max=1e-2)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert learn.yb[0].shape == (4,) + (() if make is bert else (T,))   # the targets are batch['labels']
    assert learn.xb[0].keys() >= {'input_ids', 'attention_mask'}
    losses = own_losses(model, learn.dls.valid)
    assert [n for _, n in losses] == [8, 8, 4]
    expected = sum(l * n for l, n in losses) / 20
    result = learn.validate()
    assert result[0] == pytest.approx(expected, rel=1e-5)
    assert learn.recorder.values[-1][2] == pytest.approx(expected, rel=1e-5)   # the epoch's valid_loss column
    assert learn.progress.samples == 16


def test_bert_get_preds_and_accuracy():
    "get_preds returns the logits in dataset order; accuracy (a function of logits) agrees with validate."
    learn = hf_learner(bert(), cls_samples, metrics=[accuracy])
    learn.fit(1, lr=1e-3)
    preds, targets = learn.get_preds()
    assert preds.shape == (20, 3) and targets.shape == (20,)
    model, samples = learn.model.eval(), cls_samples(20, 2)
    with torch.no_grad():
        by_hand = model(input_ids=torch.stack([s['input_ids'] for s in samples]),
                        attention_mask=torch.stack([s['attention_mask'] for s in samples])).logits
    torch.testing.assert_close(preds, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets, torch.stack([s['labels'] for s in samples]))
    assert learn.validate()[1] == pytest.approx((preds.argmax(1) == targets).float().mean().item(), abs=1e-6)


def test_gpt2_lr_find_restores_everything():
    learn = hf_learner(gpt2(), n_train=32)
    before = copy.deepcopy(learn.model.state_dict())
    suggestions = learn.lr_find(num_it=6, show_plot=False)
    assert isinstance(suggestions, SuggestedLRs) and all(v is None or math.isfinite(v) for v in suggestions)
    for k, v in learn.model.state_dict().items(): assert torch.equal(before[k], v), k


def test_dict_batch_for_a_model_taking_tensors_says_what_to_do():
    "A dict batch is passed as model(**batch): a forward with other argument names gets an error naming both."
    dls = DataLoaders.from_datasets([{'x': torch.randn(4), 'y': torch.tensor(1)}] * 8, None, bs=4)
    learn = Learner(dls, nn.Linear(4, 3), loss_func=nn.CrossEntropyLoss(), device='cpu', default_cbs=False)
    with pytest.raises(TypeError, match=r"the batch is a dict with keys \['x', 'y'\], so the model is called as model\(\*\*batch\)"):
        learn.fit(1)


def test_model_without_a_loss_and_no_loss_func():
    "loss_func=None and an output without loss: a clear error at the first batch (a causal LM given no labels)."
    learn = hf_learner(gpt2(), lambda n, seed: lm_samples(n, seed, labels=False))
    with pytest.raises(ValueError, match="no loss_func.*without one.*'labels'"): learn.fit(1)
    with pytest.raises(ValueError, match="no loss_func"):
        Learner(DataLoaders.from_tensors(torch.randn(8, 4), torch.zeros(8, dtype=torch.long), bs=4), nn.Linear(4, 2),
                device='cpu').fit(1)


def test_dict_batch_with_a_loss_func_calls_model_with_keywords():
    "Item 2 on its own (a loss_func given): the dict batch is model(**batch), yb is (batch['labels'],); equals a hand loop."
    model, loss_func = gpt2(), lambda out, labels: F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    start = copy.deepcopy(model.state_dict())
    seen = []
    class Keep(Callback):
        def before_batch(self):
            if self.training: seen.append(self.learn.xb[0])
    learn = hf_learner(model, loss_func=loss_func, opt_func=torch.optim.SGD, wd=0., cbs=[Keep()])
    learn.fit(1, lr=0.1)
    assert len(seen) == 2 and torch.equal(learn.yb[0], learn.xb[0]['labels'])
    by_hand = gpt2(); by_hand.load_state_dict(start); by_hand.train()
    opt = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    for b in seen:                                     # the batches the learner trained on, in its order
        loss_func(by_hand(**b), b['labels']).backward(); opt.step(); opt.zero_grad()
    for k, v in by_hand.state_dict().items(): torch.testing.assert_close(learn.model.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


# ---- item 4: outputs that are not tensors ----

class DictOut(nn.Module):
    "A model returning a dict without logits, and one tuple output: gathered field by field."
    def __init__(self): super().__init__(); self.lin = nn.Linear(4, 3)
    def forward(self, x): h = self.lin(x); return {'loss': h.pow(2).mean(), 'hidden': h, 'pair': (h.sum(1), x)}


def test_get_preds_gathers_dict_and_tuple_outputs_in_dataset_order():
    torch.manual_seed(0)
    x = torch.randn(20, 4)
    dls = DataLoaders.from_datasets([{'x': r} for r in x], [{'x': r} for r in x], bs=8)
    learn = Learner(dls, DictOut(), device='cpu', default_cbs=False, cbs=[Recorder()])
    learn.fit(1)
    preds, targets = learn.get_preds(dls.train)     # a shuffled loader: still dataset order
    assert targets is None
    with torch.no_grad(): h = learn.model.lin(x)
    torch.testing.assert_close(preds['hidden'], h)
    torch.testing.assert_close(preds['pair'][0], h.sum(1)); torch.testing.assert_close(preds['pair'][1], x)
    assert preds['loss'].shape == (3,)              # 0-d fields: one value per batch


def test_model_output_with_tuple_batches_metrics_and_get_preds():
    "Item 4 on its own (tuple batches, a loss_func): metrics and get_preds see a ModelOutput's logits."
    samples = cls_samples(20, 2)
    ids, labels = torch.stack([s['input_ids'] for s in samples]), torch.stack([s['labels'] for s in samples])
    dls = DataLoaders(TensorLoader(ids, labels, bs=8), TensorLoader(ids, labels, bs=8))
    learn = Learner(dls, bert(), loss_func=lambda out, y: F.cross_entropy(out.logits, y), metrics=[accuracy], device='cpu')
    learn.progress.show_bar = learn.progress.show_table = False
    learn.fit(1, lr=1e-3)
    preds, targets = learn.get_preds()
    with torch.no_grad(): by_hand = learn.model.eval()(ids).logits
    torch.testing.assert_close(preds, by_hand, rtol=1e-5, atol=1e-6); assert torch.equal(targets, labels)
    assert learn.validate()[1] == pytest.approx((by_hand.argmax(1) == labels).float().mean().item(), abs=1e-6)


# ---- item 5: exact means without targets ----

def test_epoch_means_are_exact_without_targets():
    "20 samples in batches of 8, 8, 4 with no targets: each batch weighs its size, and samples counts samples."
    torch.manual_seed(0)
    x, xv = torch.randn(64, 4), torch.randn(20, 4) * torch.arange(1, 21.).unsqueeze(1)   # very different batch losses
    dls = DataLoaders(TensorLoader(x, bs=8, shuffle=True), TensorLoader(xv, bs=8))   # batches (x,): no targets
    learn = Learner(dls, nn.Linear(4, 3), loss_func=lambda pred: pred.pow(2).mean(), device='cpu', default_cbs=False,
                    cbs=[Recorder()])
    learn.fit(1, lr=1e-3)
    assert learn.progress.samples == 64
    with torch.no_grad(): per_sample = learn.model(xv).pow(2).mean(1)
    assert learn.validate()[0] == pytest.approx(per_sample.mean().item(), rel=1e-5)


# ---- item 6: saved keys are the model's own ----

def test_save_loads_into_a_fresh_bare_model(tmp_path):
    learn = hf_learner(gpt2(), path=tmp_path)
    learn.fit_one_cycle(1, lr_max=1e-2)
    file = learn.save('gpt2')
    fresh = gpt2(seed=1)
    fresh.load_state_dict(torch.load(file, weights_only=True)['model'])   # strict: every key is the model's own
    ids = torch.stack([s['input_ids'] for s in lm_samples(4, 3)])
    learn.model.eval(); fresh.eval()
    with torch.no_grad(): assert torch.equal(fresh(input_ids=ids).logits, learn.model(input_ids=ids).logits)


def test_compiled_model_saves_the_same_keys(tmp_path):
    model = gpt2()
    learn = hf_learner(torch.compile(model, backend='eager'), path=tmp_path)
    learn.create_opt()
    assert learn.opt.exempt_names == hf_learner(gpt2()).create_opt().exempt_names   # no `_orig_mod.` in the names
    keys = torch.load(learn.save('c'), weights_only=True)['model'].keys()
    assert set(keys) == set(model.state_dict())


# ---- item 1: decay spares every norm layer, whatever its class ----

def zero_grad_step(learn):
    "One SGD step with zero gradients: only decay moves a parameter."
    learn.opt = None; learn.opt_func = torch.optim.SGD; learn.create_opt()
    for p in learn.model.parameters(): p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    learn.opt.step()
    return {n for n, p in learn.model.named_parameters() if torch.equal(p, before[n])}


def test_llama_rmsnorm_gains_are_not_decayed():
    learn = hf_learner(llama(), wd=0.1)
    spared = zero_grad_step(learn)
    norms = {n for n, _ in learn.model.named_parameters() if 'norm' in n}
    assert len(norms) == 5 and norms <= spared                  # all five LlamaRMSNorm weights
    assert spared == {n for n, p in learn.model.named_parameters() if p.ndim <= 1}   # and nothing else
    learn.bn_wd = True
    assert zero_grad_step(learn).isdisjoint(norms)              # bn_wd=True opts the gains back in


class ScaledModel(nn.Module):
    "timm's convention: the model names parameters to spare in its own no_weight_decay()."
    def __init__(self):
        super().__init__(); self.pos_embed, self.head = nn.Parameter(torch.randn(5, 4)), nn.Linear(4, 2)
    def no_weight_decay(self): return {'pos_embed'}
    def forward(self, x): return self.head(x + self.pos_embed.sum(0))


def test_no_weight_decay_names_and_no_decay_rule():
    dls = DataLoaders.from_tensors(torch.randn(8, 4), torch.zeros(8, dtype=torch.long), bs=4)
    learn = Learner(dls, ScaledModel(), loss_func=nn.CrossEntropyLoss(), wd=0.1, device='cpu')
    assert zero_grad_step(learn) == {'pos_embed', 'head.bias'}
    learn = Learner(dls, ScaledModel(), loss_func=nn.CrossEntropyLoss(), wd=0.1, device='cpu',
                    no_decay=lambda name, p: name.startswith('head.'))
    assert zero_grad_step(learn) == {'head.weight', 'head.bias'}   # the callable replaces the whole rule
    with pytest.raises(ValueError, match='no_decay replaces'):
        Learner(dls, ScaledModel(), loss_func=nn.CrossEntropyLoss(), bias_wd=True, no_decay=lambda n, p: False)


# ---- a nanoGPT-style recipe vs a hand-written loop of the same recipe ----

class LayerNorm(nn.Module):
    "nanoGPT's LayerNorm: a plain Module (not torch's class) with an optional bias."
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(ndim)), nn.Parameter(torch.zeros(ndim)) if bias else None
    def forward(self, x): return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    def __init__(self, d, n_head, bias):
        super().__init__()
        self.n_head, self.ln_1, self.ln_2 = n_head, LayerNorm(d, bias), LayerNorm(d, bias)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=bias), nn.GELU(), nn.Linear(4 * d, d, bias=bias))
    def forward(self, x):
        B, T_, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T_, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T_, C)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    "nanoGPT's model in miniature: tied embeddings, its own LayerNorm, forward(idx, targets=None) -> (logits, loss)."
    def __init__(self, vocab=V, block_size=T, d=32, n_layer=2, n_head=2, bias=True):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.h = nn.ModuleList([Block(d, n_head, bias) for _ in range(n_layer)])
        self.ln_f, self.lm_head = LayerNorm(d, bias), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h: x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def nanogpt_opt(model, lr, wd):
    "nanoGPT's configure_optimizers: decay every parameter with dim >= 2, none of the others; AdamW betas (0.9, 0.95)."
    params = [p for p in model.parameters()]   # tied: once
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': wd}, {'params': no_decay, 'weight_decay': 0.}],
                             lr=lr, betas=(0.9, 0.95))


def test_nanogpt_recipe_matches_a_hand_written_loop():
    """nanoGPT's recipe: warm-up over W steps linearly from 0, cosine to min_lr over the rest (phaselearn:
    `fit_warmup_cosine`), clip at 1.0, AdamW betas (0.9, 0.95), wd 0.1 only where nanoGPT decays (here: phaselearn's
    default rule, no splitter, no no_decay). Learning rates: equal at every step to 1e-12 relative; they are not
    bit-equal (6.7e-16 relative at most, measured) because phaselearn computes each sub-schedule's position as
    (pct - start) / length in floats while the loop uses integer step counts. Weights: within 1e-6 absolute; measured
    bit-identical, since both run the same operations in the same order (decoupled decay `p * (1 - lr*wd)`, then Adam,
    as torch's AdamW does), and float64 learning rates that differ in their last bit round to the same float32 step.
    One detail matters: the loop clips the parameters in its optimizer's order (decayed group first), the order
    phaselearn's GradientClip walks. Clipping `model.parameters()` adds the per-tensor norms in another order, the
    global norm differs in its last float32 bit, and Adam's first steps (close to lr * sign(g) per element) carry that
    into the weights: up to 6e-5 after these 12 steps, measured. A comparison with that loop would need a tolerance
    of that size, and could not tell a rounding difference from a small bug."""
    lr_max, min_lr, wd, W, N, bs = 3e-3, 3e-4, 0.1, 4, 12, 4
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (N * bs, T + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]

    def get_lr(it):   # nanoGPT's schedule (warm-up from 0 here, as SchedLin(0, lr_max) does)
        if it < W: return lr_max * it / W
        ratio = (it - W) / (N - W)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr_max - min_lr)

    torch.manual_seed(0); model = GPT(); start = copy.deepcopy(model.state_dict())
    opt, lrs = nanogpt_opt(model, lr_max, wd), []
    for it in range(N):
        lr = get_lr(it); lrs.append(lr)
        for group in opt.param_groups: group['lr'] = lr
        logits, _ = model(x[it * bs:(it + 1) * bs])
        F.cross_entropy(logits.view(-1, V), y[it * bs:(it + 1) * bs].reshape(-1)).backward()
        nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group['params']], 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)

    ours = GPT(); ours.load_state_dict(start)
    dls = DataLoaders(TensorLoader(x, y, bs=bs), None)
    learn = Learner(dls, ours, loss_func=lambda out, targ: F.cross_entropy(out[0].view(-1, V), targ.reshape(-1)),
                    opt_func=partial(torch.optim.AdamW, betas=(0.9, 0.95)), wd=wd, cbs=[GradientClip(1.0)], device='cpu')
    learn.progress.show_bar = learn.progress.show_table = False
    learn.fit_warmup_cosine(1, lr_max=lr_max, warmup_pct=W / N, div_final=lr_max / min_lr)   # one epoch of N batches
    recorded = learn.recorder.hyper('lr')[:, 0].tolist()
    assert len(recorded) == N
    assert recorded == pytest.approx(lrs, rel=1e-12, abs=1e-18)
    assert learn.opt.get_hyper('mom') == [0.9] and learn.opt.get_hyper('sqr_mom') == [0.95]   # the user's betas stand
    for (name, p), q in zip(ours.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert learn.opt.exempt_names == sorted(n for n, p in ours.named_parameters() if p.dim() < 2)


# ---- kill -9 in the middle of fitting a Hugging Face model, resume bit-identical ----

def worker_learner(folder):
    torch.set_num_threads(1)
    return hf_learner(gpt2(), n_train=32, path=folder, cbs=[CheckpointCallback(every_iters=3)])


class KillAt(Callback):
    order = 100   # after the checkpoint of the same batch
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.training and self.learn.train_iter == self.at: os.kill(os.getpid(), signal.SIGKILL)


def worker(mode, folder, at):
    "The killed process: train until training batch `at`, then SIGKILL (no cleanup, no flush, like an OOM kill)."
    assert mode == 'kill'
    worker_learner(folder).fit_one_cycle(2, lr_max=1e-2, cbs=[KillAt(int(at))])


def test_kill_then_resume_gpt2_is_bit_identical(tmp_path):
    "kill -9 in the second epoch, 2 batches after a checkpoint; the resumed fit (in this process) equals an uninterrupted one."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(Path(__file__).parent.parent)] + sys.path)}
    killed = subprocess.run([sys.executable, __file__, 'kill', str(tmp_path), '5'], capture_output=True, text=True,
                            timeout=300, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = worker_learner(tmp_path)
    resumed.fit_one_cycle(2, lr_max=1e-2, resume='checkpoint')
    reference = worker_learner(tmp_path / 'reference')
    reference.fit_one_cycle(2, lr_max=1e-2)
    for k, v in reference.model.state_dict().items(): assert torch.equal(resumed.model.state_dict()[k], v), k
    assert resumed.recorder.values[-1][1:3] == reference.recorder.values[-1][1:3]   # train and valid loss of the last epoch


if __name__ == '__main__': worker(*sys.argv[1:])
