"""Throughput and peak memory of half-precision training with phaselearn, against float32.

Modes: fp32; bf16 and fp16 autocast (`MixedPrecision`, fp16 with dynamic loss scaling); fp16 weights with fp32 master
weights (`FP16Training`). Models: a small CNN (4 conv layers of 128 to 512 channels on 32x32 RGB, batch 256) and a transformer block
(`nn.TransformerEncoderLayer`, d_model 512, 8 heads, seq 256, batch 32). Each run is a fresh phaselearn `Learner`
(Adam, constant lr, the Recorder only) on synthetic in-memory data already on the GPU (`DataLoaders.from_tensors`), a
warm-up, then `--steps` timed optimizer steps. Reported: samples/s, peak GPU memory during the timed steps
(`torch.cuda.max_memory_allocated`, less the data set, which is the same for every mode), each as a ratio to fp32, the
steps skipped for overflow, and the last smoothed loss (must be finite). `--vs-hand` adds 'x hand': phaselearn's samples/s
over a hand-written loop's (autocast around forward and loss, a GradScaler for fp16, Adam, wd 0 on both sides), target
>= 0.98. Models: also `lm`, a small causal transformer language model (4 pre-norm layers, d_model 512, seq 256, vocab 8192,
batch 32, loss over every position).

    python bench/precision.py               # needs a CUDA GPU; about a minute on an H100
    python bench/precision.py --cpu-smoke   # tiny shapes on the CPU: checks that everything runs, numbers mean nothing

Needs only torch and phaselearn (`pip install -e .` from the repository); no downloads.
"""
import argparse, gc, math, sys, time
import torch
from torch import nn
from phaselearn.core import set_seed
from phaselearn.data import DataLoaders
from phaselearn.recorder import Recorder
from phaselearn.learner import Learner
from phaselearn.phases import TrainingPhase
from phaselearn.mixed_precision import MixedPrecision, FP16Training

MODES = ('fp32', 'bf16', 'fp16', 'fp16-master')


def apply_mode(learn, mode):
    if mode == 'bf16': learn.to_bf16()
    elif mode == 'fp16': learn.to_fp16()
    elif mode == 'fp16-master': learn.to_fp16(classic=True)
    return learn


def cnn(width=128, n_classes=10):
    def block(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
                         *block(4 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, n_classes))


class MeanPool(nn.Module):
    def forward(self, x): return x.mean(1)


def transformer(d_model=512, nhead=8, n_classes=10):
    return nn.Sequential(nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.1, batch_first=True),
                         MeanPool(), nn.Linear(d_model, n_classes))


class LanguageModel(nn.Module):
    "A small causal transformer LM: token embedding + learned positions, `n_layers` pre-norm encoder layers, tied head."
    def __init__(self, vocab=8192, d_model=512, nhead=8, n_layers=4, seq=256):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d_model), nn.Parameter(torch.zeros(seq, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.1, batch_first=True, norm_first=True)
        self.layers, self.norm = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False), nn.LayerNorm(d_model)
        self.register_buffer('mask', nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)
    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[:tokens.shape[1]]
        h = self.layers(h, mask=self.mask[:tokens.shape[1], :tokens.shape[1]], is_causal=True)
        return self.norm(h) @ self.embed.weight.T / self.embed.embedding_dim ** 0.5  # logits of order 1 at the start


def lm_loss(logits, targets): return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def configs(smoke: bool) -> dict:
    "name -> (model factory, input shape of one sample, batch size); an 'lm' input is token ids (the targets: the next ones)."
    if smoke:
        return {'cnn': (lambda: cnn(width=8), (3, 8, 8), 8),
                'transformer': (lambda: transformer(d_model=32, nhead=4), (16, 32), 4),
                'lm': (lambda: LanguageModel(vocab=64, d_model=32, nhead=4, n_layers=1, seq=16), (16,), 4)}
    return {'cnn': (cnn, (3, 32, 32), 256),
            'transformer': (transformer, (256, 512), 32),
            'lm': (LanguageModel, (256,), 32)}


def make_data(make_model, sample_shape, n, device):
    "Synthetic inputs and targets: images/sequences and class labels, or token ids and the next tokens for an LM."
    if len(sample_shape) == 1:  # token ids: the lm
        vocab = make_model().embed.num_embeddings
        tokens = torch.randint(0, vocab, (n, sample_shape[0] + 1), device=device)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), lm_loss
    return (torch.randn(n, *sample_shape, device=device), torch.randint(0, 10, (n,), device=device),
            nn.CrossEntropyLoss())


def hand_run(make_model, sample_shape, bs, mode, device, steps, warmup, n_batches=8):
    """The same training by hand: AdamW-free Adam (wd 0, as the phaselearn side in --vs-hand), autocast around forward
    and loss, fp16 with a GradScaler; batches gathered from the same in-memory tensors. Samples per second."""
    set_seed(0)
    x, y, loss_func = make_data(make_model, sample_shape, n_batches * bs, device)
    model = make_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(mode)
    scaler = torch.amp.GradScaler(device.type) if mode == 'fp16' else None
    def steps_(n):
        order = torch.randperm(len(x), device=device)
        for i in range(n):
            idx = order[(i % n_batches) * bs:(i % n_batches + 1) * bs]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_func(model(x[idx]), y[idx])
            if scaler is not None: scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
            else: loss.backward(); opt.step()
            opt.zero_grad()
    steps_(warmup)
    if device.type == 'cuda': torch.cuda.synchronize()
    start = time.perf_counter(); steps_(steps)
    if device.type == 'cuda': torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - start)


def run(make_model, sample_shape, bs, mode, device, steps, warmup, n_batches=8, wd=0.01):
    "One timed run: (samples per second, peak bytes above the data, skipped steps, last smoothed loss)."
    set_seed(0)
    x, y, loss_func = make_data(make_model, sample_shape, n_batches * bs, device)
    dls = DataLoaders.from_tensors(x, y, bs=bs, device=device)
    cuda = device.type == 'cuda'
    if cuda: torch.cuda.synchronize(); data_bytes = torch.cuda.memory_allocated()
    learn = Learner(dls, make_model(), loss_func=loss_func, lr=1e-4, wd=wd, device=device,
                    cbs=[Recorder()], default_cbs=False)
    apply_mode(learn, mode)
    learn.fit_phases([TrainingPhase(iters=warmup)])
    if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    learn.fit_phases([TrainingPhase(iters=steps)])
    if cuda: torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - data_bytes if cuda else float('nan')
    precision = [cb for cb in learn.cbs if isinstance(cb, (MixedPrecision, FP16Training))]
    skipped = precision[0].skipped if precision else 0
    last_loss = learn.recorder.smoothed_losses[-1]
    del learn, dls, x, y
    gc.collect()
    if cuda: torch.cuda.empty_cache()
    return steps * bs / seconds, peak, skipped, last_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cpu-smoke', action='store_true', help="tiny shapes on the CPU, to check the script runs")
    parser.add_argument('--steps', type=int, default=None, help="timed steps per run (default 300; 3 with --cpu-smoke)")
    parser.add_argument('--warmup', type=int, default=None, help="untimed steps first (default 30; 1 with --cpu-smoke)")
    parser.add_argument('--models', default='cnn,transformer,lm', help="comma-separated: cnn, transformer, lm")
    parser.add_argument('--vs-hand', action='store_true',
                        help="also time a hand-written autocast loop for fp32, bf16 and fp16 (both sides wd=0): column 'x hand'")
    parser.add_argument('--modes', default=','.join(MODES), help=f"comma-separated, from {', '.join(MODES)} (fp32 is the reference)")
    args = parser.parse_args(argv)

    if args.cpu_smoke: device = torch.device('cpu')
    elif torch.cuda.is_available(): device = torch.device('cuda')
    else:
        print("bench/precision.py measures GPU throughput and memory and needs a CUDA GPU, and none is visible to torch. "
              "Run `python bench/precision.py --cpu-smoke` for a tiny CPU run that only checks the script works.",
              file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else (3 if args.cpu_smoke else 300)
    warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 30)
    models, modes = args.models.split(','), args.modes.split(',')
    all_configs = configs(args.cpu_smoke)
    for name in models:
        if name not in all_configs: parser.error(f"unknown model {name!r}; valid: {', '.join(all_configs)}")
    for mode in modes:
        if mode not in MODES: parser.error(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if 'fp32' not in modes: modes = ['fp32'] + modes
    if device.type == 'cuda' and 'bf16' in modes and not torch.cuda.is_bf16_supported():
        print("this GPU has no bfloat16 support: bf16 skipped"); modes = [m for m in modes if m != 'bf16']

    where = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (smoke test: the numbers mean nothing)'
    tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == 'cuda' else False
    print(f"torch {torch.__version__} on {where}; {steps} timed steps after {warmup} warm-up steps per run; "
          f"fp32 matmuls {'may use TF32' if tf32 else 'in full fp32 (TF32 off)'}")
    failed = False
    for name in models:
        make_model, shape, bs = all_configs[name]
        print(f"\n{name}: batch {bs} x {shape}")
        print(f"  {'mode':<12} {'samples/s':>11} {'x fp32':>7} {'peak MiB':>9} {'x fp32':>7} {'skipped':>8} {'last loss':>10}"
              + (f" {'x hand':>7}" if args.vs_hand else ''))
        reference = None
        for mode in modes:
            try:
                speed, peak, skipped, loss = run(make_model, shape, bs, mode, device, steps, warmup, wd=0. if args.vs_hand else 0.01)
                vs_hand = (speed / hand_run(make_model, shape, bs, mode, device, steps, warmup)
                           if args.vs_hand and mode != 'fp16-master' else None)
            except Exception as e:
                failed = True
                print(f"  {mode:<12} FAILED: {type(e).__name__}: {str(e)[:200]}")
                continue
            if mode == 'fp32': reference = (speed, peak)
            speed_ratio = speed / reference[0] if reference else float('nan')
            mem_ratio = peak / reference[1] if reference and reference[1] > 0 else float('nan')
            mib = peak / 2 ** 20
            print(f"  {mode:<12} {speed:>11.1f} {speed_ratio:>7.2f} {mib:>9.1f} {mem_ratio:>7.2f} {skipped:>8d} {loss:>10.4f}"
                  + (f" {vs_hand:>7.3f}" if vs_hand is not None else ''))
            if not math.isfinite(loss): failed = True; print(f"  {mode}: the loss is not finite")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
