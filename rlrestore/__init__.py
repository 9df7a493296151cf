"""rlrestore: distributed RL post-training (Pref-Restore) for blind face restoration on Ray."""

import logging

__version__ = "0.1.0"

# bitsandbytes (a pyiqa dependency, imported by peft) warns on import on CPUs with AVX512-BF16
# that it cannot fetch an optional quantised-GEMM kernel from the Hub; rlrestore never uses
# 4-bit layers, so the warning is noise in every learner and test log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
