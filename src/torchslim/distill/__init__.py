"""Knowledge distillation: teacher-student, feature hints, simulated (data-free) distillation, parameter fusion."""

from torchslim._callable_module import make_module_callable
from torchslim.distill.api import KD, distill, kd_loss_fn, teacher_logits
from torchslim.distill.fusion import FusionResult, fuse_parameters
from torchslim.distill.losses import attention_map, distillation_loss, feature_loss
from torchslim.distill.synthetic import SyntheticData, synthesize

__all__ = [
    "KD",
    "FusionResult",
    "SyntheticData",
    "attention_map",
    "distill",
    "distillation_loss",
    "feature_loss",
    "fuse_parameters",
    "kd_loss_fn",
    "synthesize",
    "teacher_logits",
]

# ``import torchslim.distill`` rebinds ``torchslim.distill`` to this package; calls go on to the function ``distill``.
make_module_callable(__name__, "distill")
