"Everything public: `from phaselearn.all import *`. The one hand-kept file of the package."
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
