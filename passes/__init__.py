"""peftc's passes, one per file; importing this package registers them all."""

from . import freeze_base, insert_lora  # noqa: F401
from . import insert_ia3, insert_prefix, insert_prompt_tuning  # noqa: F401
from . import insert_bitfit, insert_norm_tuning, insert_sparse_delta  # noqa: F401
from . import insert_modules_to_save  # noqa: F401
from . import insert_adapters, insert_mixed_lora  # noqa: F401  (several adapters: peftc/adapters.py)
from . import insert_trainable_tokens, insert_ln_tuning  # noqa: F401
from . import insert_adapter, insert_adaption_prompt, insert_p_tuning  # noqa: F401
from . import insert_method  # noqa: F401  (the base of every peftc.Method's pass)
from . import prune_grads  # noqa: F401
from . import fold_params, merge_reparam  # noqa: F401
from . import schedule_recompute  # noqa: F401
from . import fuse_linear_cross_entropy  # noqa: F401
from . import recompute_cheap  # noqa: F401
