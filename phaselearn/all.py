"""The user's API: `from phaselearn.all import *`. The one hand-kept file of the package.

Each module's `__all__` is its user API; helpers the package uses internally are exported with `#| exporti` (importable
from their module, not star-imported). The docs-site tooling (`phaselearn.docs`) is the project's build tooling, not the
user's API: it is not imported here. tests/test_public_api.py holds the documented list this namespace must match."""
from .core import *
from .data import *
from .callback import *
from .metrics import *
from .recorder import *
from .optimizer import *
from .schedule import *
from .learner import *
from .phases import *
from .lr_finder import *
from .mixed_precision import *
from .checkpoint import *
from .rnn import *
from .widgets import *
from .training_extras import *
from .loss import *
from .distributed import *
from .tracking import *
from .demo import *
from .compile import *
from .fsdp import *
from .trackers import *
