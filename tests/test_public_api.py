"""The public API as users reach it: `from phaselearn.all import *` gives every module's `__all__`, and every public
name (and every public method of a public class) says in a docstring what it does."""
import importlib, inspect, pkgutil
import phaselearn
import phaselearn.all as everything

TOOLING = {'all', '_modidx'}  # the star-import file itself and nbdev's index: no `__all__` of their own


def _modules():
    "Every module of the package, found on disk so that a new module cannot be forgotten here."
    return [importlib.import_module(f'phaselearn.{info.name}') for info in pkgutil.iter_modules(phaselearn.__path__)
            if info.name not in TOOLING]


def test_modules_are_discovered():
    names = {m.__name__.rsplit('.', 1)[1] for m in _modules()}
    assert {'tracking', 'learner', 'recorder', 'checkpoint', 'widgets', 'distributed', 'training_extras'} <= names


def test_every_module_declares_all():
    assert [m.__name__ for m in _modules() if not hasattr(m, '__all__')] == []


def test_all_exports_every_public_name():
    missing = [f'{m.__name__}.{name}' for m in _modules() for name in m.__all__ if not hasattr(everything, name)]
    assert missing == [], f"missing from phaselearn.all (add a star import to phaselearn/all.py): {missing}"


def test_all_exports_the_same_objects():
    "A name in phaselearn.all is the module's own object (no shadowing by a later star import)."
    clashes = [f'{m.__name__}.{name}' for m in _modules() for name in m.__all__
               if hasattr(everything, name) and getattr(everything, name) is not getattr(m, name)]
    assert clashes == [], clashes


def test_star_import_gives_the_tracking_callbacks():
    namespace = {}
    exec('from phaselearn.all import *', namespace)
    for name in ('EarlyStoppingCallback', 'SaveModelCallback', 'ReduceLROnPlateau', 'TerminateOnNaNCallback',
                 'TrackerCallback', 'TensorBoardCallback', 'Learner', 'CheckpointCallback', 'schedule_widget'):
        assert name in namespace, name
    assert 'main' not in namespace  # a script's own `main` is not shadowed by the digits command


def _public_names():
    return sorted({name for m in _modules() for name in m.__all__})


_UNHELPFUL = ('Call self as a function', 'Initialize self', 'Create and return a new object', 'Return repr(self)',
              'Helper for pickle', 'Return str(self)')


def _has_doc(obj) -> bool:
    doc = inspect.getdoc(obj)
    return bool(doc and doc.strip()) and not doc.strip().startswith(_UNHELPFUL)


def _public_methods(cls):
    "Public methods and properties defined by `cls` itself (inherited ones are checked on the class defining them)."
    for name, value in vars(cls).items():
        if name.startswith('_'): continue
        if isinstance(value, property): yield name, value
        elif isinstance(value, (staticmethod, classmethod)): yield name, value.__func__
        elif inspect.isfunction(value): yield name, getattr(cls, name)


def _undocumented():
    undocumented = []
    for name in _public_names():
        obj = getattr(everything, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj)): continue  # constants, lists
        if obj.__module__.split('.')[0] != 'phaselearn': continue  # a re-exported torch/fastcore name documents itself
        if not _has_doc(obj): undocumented.append(name)
        if inspect.isclass(obj):
            undocumented += [f'{name}.{method}' for method, value in _public_methods(obj) if not _has_doc(value)]
    return undocumented


def test_every_public_name_has_a_docstring():
    assert _undocumented() == [], f"public names without a docstring (show_doc would print nothing useful): {_undocumented()}"


def test_docstring_check_can_fail():
    class Example:
        def documented(self): "Does a thing."
        def bare(self): pass
        __call__ = bare
    assert _has_doc(Example.documented) and not _has_doc(Example.bare)
    assert not _has_doc(object.__call__ if hasattr(object, '__call__') else type.__call__)
    assert [n for n, v in _public_methods(Example) if not _has_doc(v)] == ['bare']
