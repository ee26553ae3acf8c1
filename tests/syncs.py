"""Counting host-device synchronisations in tests (shared by several test files).

`SyncCounter` records every call that reads a tensor's value on the host (`.item()`, `float(t)`, `.tolist()`, ...) with
the code that made it; `cuda_sync_warnings` asks CUDA itself (`torch.cuda.set_sync_debug_mode`) what synchronised.
"""
import collections, functools, os, sys, warnings
import torch
import phaselearn

# the imported package's own folder, not any path that happens to contain 'phaselearn' (a clone is often named so)
_PACKAGE_DIR = os.path.dirname(os.path.realpath(phaselearn.__file__)).replace('\\', '/') + '/'

SYNC_METHODS = ('item', 'tolist', 'numpy', '__float__', '__int__', '__bool__', '__index__', '__complex__')
_TENSOR_HELPERS = ('torch/_tensor.py', 'torch/_tensor_str.py', 'torch/overrides.py')  # f"{t}" calls item() from here


def _caller(frame):
    "The first frame outside torch's Tensor helpers: the code that asked for the value."
    while frame is not None and frame.f_code.co_filename.replace('\\', '/').endswith(_TENSOR_HELPERS): frame = frame.f_back
    return frame


@functools.lru_cache(maxsize=None)
def _real(filename: str) -> str: return os.path.realpath(filename).replace('\\', '/')


def _origin(frame) -> str:
    "Who asked for the value, as 'phaselearn', 'torch.optim', or a file name."
    if frame is None: return '?'
    filename = _real(frame.f_code.co_filename)
    if filename.startswith(_PACKAGE_DIR): return 'phaselearn'
    if '/torch/optim/' in filename: return 'torch.optim'
    return filename


class SyncCounter:
    "Counts, by origin, the calls that read a tensor's value on the host while active (a context manager)."
    def __init__(self): self.calls, self.tensor_ids, self.files = collections.Counter(), collections.defaultdict(set), collections.Counter()
    def __enter__(self):
        self._saved = {name: torch.Tensor.__dict__.get(name) for name in SYNC_METHODS}
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
                frame = _caller(sys._getframe(1))
                origin = _origin(frame)
                self.calls[(origin, _name)] += 1
                if frame is not None: self.files[frame.f_code.co_filename.replace('\\', '/')] += 1
                self.tensor_ids[origin].add(id(tensor))
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, wrapper)
        return self
    def __exit__(self, *exc):
        for name, saved in self._saved.items():
            if saved is None: delattr(torch.Tensor, name)
            else: setattr(torch.Tensor, name, saved)
    def total(self, exclude=()) -> int: return sum(n for (origin, _), n in self.calls.items() if origin not in exclude)
    def by_origin(self, origin) -> int: return sum(n for (o, _), n in self.calls.items() if o == origin)
    def by_file(self, suffix) -> int:
        "Calls made from a file whose path ends with `suffix` (e.g. 'phaselearn/rnn.py')."
        return sum(n for file, n in self.files.items() if file.endswith(suffix))


def cuda_sync_warnings(fn) -> list:
    "The warnings CUDA's sync debug mode raises for synchronising calls while `fn()` runs."
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try: fn()
        finally: torch.cuda.set_sync_debug_mode(0)
    return [w for w in caught if 'called a synchronizing' in str(w.message)]  # not the 'prototype feature' notice
