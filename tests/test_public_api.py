"""The public API as users reach it: `from phaselearn.all import *` gives exactly the documented user API (`USER_API`
below: nothing missing, nothing extra), each module's `__all__` is its part of that list, and every public name (and
every public method of a public class) says in a docstring what it does."""
import importlib, inspect, pkgutil
import phaselearn
import phaselearn.all as everything

TOOLING = {'all', '_modidx'}  # the star-import file itself and nbdev's index: no `__all__` of their own
NOT_USER_API = {'docs'}       # the docs-site build (the project's tooling): its own module, never in phaselearn.all

# THE USER API: every name `from phaselearn.all import *` gives, by the module that defines it. To add a public name:
# export it from its chapter (`#| export`), then list it here, under its module. A helper the package needs but users
# do not goes in an `#| exporti` cell (importable from its module, not star-imported) or gets a leading underscore.
USER_API = {
    'core': ['set_seed', 'rng_state_dict', 'load_rng_state_dict', 'default_device', 'is_distributed', 'rank_and_world_size',
             'is_main_process'],
    'data': ['EpochSampler', 'TensorLoader', 'DataLoaders', 'digits_tensors', 'digits_dls'],
    'callback': ['CancelBatchException', 'CancelStepException', 'CancelTrainException', 'CancelValidException',
                 'CancelEpochException', 'CancelFitException', 'Callback', 'sort_callbacks', 'TrainEvalCallback'],
    'metrics': ['Metric', 'AvgMetric', 'accuracy', 'error_rate', 'mse', 'mae', 'rmse', 'perplexity', 'TorchMetric',
                'as_metric', 'AvgLoss', 'AvgSmoothLoss', 'output_preds'],
    'recorder': ['Recorder', 'ProgressCallback', 'CSVLogger', 'ShowGraphCallback'],
    'optimizer': ['norm_types', 'unified_hyper_names', 'default_splitter', 'sequential_splitter', 'body_head_splitter',
                  'check_layer_groups', 'OptimWrapper', 'spread_values', 'hyper_range', 'check_hyper_value',
                  'check_hyper_values'],
    'schedule': ['Schedule', 'SchedLin', 'SchedCos', 'SchedExp', 'SchedPoly', 'SchedConst', 'SchedNo', 'CombinedSchedule',
                 'combine_scheds', 'SchedStep', 'SchedMultiStep', 'SchedExpDecay', 'SchedInvTime', 'SchedInvSqrt',
                 'SchedPolyDecay', 'SchedCyclic', 'SchedCosRestarts', 'SchedSqrtDecay', 'SchedWSD', 'SchedWindow'],
    'learner': ['FORMAT_VERSION', 'unwrap_model', 'LoadError', 'Learner', 'GatherPreds', 'in_dataset_order',
                'TrainingProgress', 'state_checksum', 'checksum_matches', 'check_opt_state'],
    'phases': ['TrainingPhase', 'resolve_groups', 'Phases', 'plot_hypers', 'Preview', 'attr_target', 'PhaseScheduler',
               'check_plan_values', 'OneCycle', 'SGDR', 'FlatCos', 'WarmupCosine', 'WSD'],
    'lr_finder': ['suggest_minimum', 'suggest_steep', 'suggest_valley', 'SuggestedLRs', 'LRFinder', 'LearnerSnapshot',
                  'LRFindResult'],
    'mixed_precision': ['MixedPrecision', 'FP16Training', 'GradientClip'],
    'checkpoint': ['CHECKPOINT_VERSION', 'clean_partial_writes', 'checkpoint_files', 'CheckpointCallback', 'read_checkpoint',
                   'ResumeCallback', 'resume_from'],
    'rnn': ['LMDataLoader', 'CharLM', 'lm_loss', 'RNNCallback', 'LossTerm', 'rnn_time_dim', 'RNNRegularizer', 'rnn_cbs'],
    'widgets': ['ScheduleExplorer', 'schedule_widget', 'LRFinderExplorer', 'lr_find_widget'],
    'training_extras': ['GradientAccumulation', 'EMACallback'],
    'loss': ['ScheduledLoss', 'SwitchLoss'],
    'distributed': ['setup_distributed', 'teardown_distributed', 'distributed_job', 'DistributedLoader', 'DistributedCallback'],
    'tracking': ['TrackerCallback', 'EarlyStoppingCallback', 'SaveModelCallback', 'ReduceLROnPlateau',
                 'TerminateOnNaNCallback', 'TensorBoardCallback'],
    'demo': ['digits_model', 'train_digits'],
    'compile': ['CompiledStep'],
    'fsdp': ['is_sharded', 'shard_model', 'FSDPCallback', 'dcp_to_weights'],
    'trackers': ['PEAK_FLOPS', 'known_peak_flops', 'ThroughputColumn', 'ThroughputCallback', 'RunLogger', 'MLflowCallback',
                 'WandbCallback', 'read_wandb_run', 'wandb_run_dirs', 'OptunaPruningCallback'],
}

# Helpers that left the star import: still importable from their modules (code written against them keeps working).
MODULE_ONLY = {
    'core': ['to_device', 'derived_seed', 'atomic_save', 'document_params', 'public_name', 'PARAMS_HEADER'], 'data': ['epoch_permutation', 'set_loader_epoch'],
    'callback': ['events', 'cancel_events', 'context_hooks', 'all_events'], 'metrics': ['batch_size', 'weighted_mean'],
    'recorder': ['read_scalars', 'quiet_env', 'in_notebook', 'format_time', 'table_text', 'table_html', 'quiet'],
    'lr_finder': ['minimum', 'steep', 'valley'], 'mixed_precision': ['half_dtypes'],
    'checkpoint': ['loader_epoch', 'loader_replay_state', 'ReplayLoader'], 'rnn': ['synthetic_text', 'char_stream'],
    'distributed': ['spawn_gloo', 'reduce_metric_accumulators'], 'widgets': ['knob_ranges'], 'demo': ['digits_cli'],
    'docs': ['build_site', 'docs_cli', 'readme_cli', 'on_post_page', 'vendor_assets', 'cdn_references', 'execute_notebook',
             'CDN_HOSTS', 'SITE_NPM', 'README_HEADER'],
}


def _modules():
    "Every module of the package, found on disk so that a new module cannot be forgotten here."
    return [importlib.import_module(f'phaselearn.{info.name}') for info in pkgutil.iter_modules(phaselearn.__path__)
            if info.name not in TOOLING]


def _star_import() -> set:
    namespace = {}
    exec('from phaselearn.all import *', namespace)
    return {name for name in namespace if not name.startswith('__')}


def test_modules_are_discovered():
    names = {m.__name__.rsplit('.', 1)[1] for m in _modules()}
    assert {'tracking', 'learner', 'recorder', 'checkpoint', 'widgets', 'distributed', 'training_extras'} <= names


def test_every_module_declares_all():
    assert [m.__name__ for m in _modules() if not hasattr(m, '__all__')] == []


def test_star_import_is_the_user_api():
    "`dir()` after the star import is the documented list: nothing missing, nothing extra."
    documented = {name for names in USER_API.values() for name in names}
    got = _star_import()
    missing, extra = sorted(documented - got), sorted(got - documented)
    assert (missing, extra) == ([], []), (
        f"from phaselearn.all import * lacks {missing} and gives {extra} beyond the documented user API. A new public name: "
        f"add it to USER_API in tests/test_public_api.py (under its module); a helper: export it with #| exporti")


def test_user_api_lists_each_module_all():
    "Each module's `__all__` is its part of the list (so the list says where each name lives), and all.py imports it."
    modules = {m.__name__.rsplit('.', 1)[1]: m for m in _modules() if m.__name__.rsplit('.', 1)[1] not in NOT_USER_API}
    assert sorted(USER_API) == sorted(modules), "USER_API needs one entry per user module (and all.py a star import of it)"
    wrong = {name: (sorted(set(m.__all__) - set(USER_API[name])), sorted(set(USER_API[name]) - set(m.__all__)))
             for name, m in modules.items() if set(m.__all__) != set(USER_API[name])}
    assert wrong == {}, f"module __all__ vs USER_API (in __all__ only, listed only): {wrong}"


def test_all_exports_the_same_objects():
    "A name in phaselearn.all is its module's own object (no shadowing by a later star import)."
    clashes = [f'{module}.{name}' for module, names in USER_API.items() for name in names
               if getattr(everything, name, None) is not getattr(importlib.import_module(f'phaselearn.{module}'), name)]
    assert clashes == [], clashes


def test_helpers_stay_importable_from_their_modules():
    got = _star_import()
    for module, names in MODULE_ONLY.items():
        m = importlib.import_module(f'phaselearn.{module}')
        assert [n for n in names if not hasattr(m, n)] == [], module
        assert [n for n in names if n in got] == [], f"{module} helpers leak into phaselearn.all"
    from phaselearn.lr_finder import minimum, steep, valley, suggest_minimum, suggest_steep, suggest_valley
    assert (minimum, steep, valley) == (suggest_minimum, suggest_steep, suggest_valley)


def test_star_import_gives_the_tracking_callbacks():
    namespace = _star_import()
    for name in ('EarlyStoppingCallback', 'SaveModelCallback', 'ReduceLROnPlateau', 'TerminateOnNaNCallback',
                 'TrackerCallback', 'TensorBoardCallback', 'Learner', 'CheckpointCallback', 'schedule_widget'):
        assert name in namespace, name
    assert 'main' not in namespace  # a script's own `main` is not shadowed by the digits command


def _public_names():
    return sorted({name for names in USER_API.values() for name in names})


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
