"""Built-in methods written with exactly the public API (peftc.Method), as a user would write them."""

from .adalora import AdaLoRA
from .boft import BOFT
from .loha import LoHa
from .lokr import LoKr
from .oft import OFT
from .vera import VeRA

__all__ = ["AdaLoRA", "BOFT", "LoHa", "LoKr", "OFT", "VeRA"]
