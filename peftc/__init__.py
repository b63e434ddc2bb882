"""peftc: a compiler for parameter-efficient fine-tuning of PyTorch models."""

from . import passes  # noqa: F401  (registers every pass)
from .api import compile
from .delta import fisher_masks
from .errors import AdapterError, BudgetError, CaptureError, ExportError, GenerationError, PassError, PeftcError, SpecError
from .lower.eager import CompiledModel
from .pipeline import Pass, PassContext, PassResult, Pipeline, register_pass
from .spec import IA3, BitFit, LoRA, Memory, ModulesToSave, NormTuning, Prefix, PromptTuning, Rule, SparseDelta, Spec
from .bottleneck import Adapter
from .soft_prompts import AdaptionPrompt, PTuning
from .method import Method, Param, Site, register_method
from .methods import BOFT, AdaLoRA, LoHa, LoKr, OFT, VeRA  # noqa: E402  (written with the public API above)
from .passes.insert_trainable_tokens import TrainableTokens
from .passes.insert_ln_tuning import LNTuning

__all__ = [
    "compile", "Spec", "Memory", "Rule", "LoRA", "Prefix", "PromptTuning", "IA3", "SparseDelta", "BitFit", "NormTuning",
    "ModulesToSave", "TrainableTokens", "LNTuning", "Adapter", "PTuning", "AdaptionPrompt", "Method", "Param", "Site",
    "register_method", "LoHa", "LoKr", "VeRA", "OFT", "BOFT", "AdaLoRA",
    "fisher_masks", "CompiledModel", "Pipeline", "Pass", "PassContext", "PassResult", "register_pass",
    "PeftcError", "SpecError", "CaptureError", "PassError", "AdapterError", "ExportError",
    "GenerationError", "BudgetError",
]
__version__ = "0.1.0"
