"""Graph passes: clean-ups and fusions behind a pass manager with levels -O0 to -O3."""

from .manager import (
           LEVELS,
           PASSES,
           PassOptionError,
           PassReport,
           PassVerificationError,
           kernel_count,
           optimize,
)
from .memory import MemoryPlan, liveness, plan_memory

__all__ = ["LEVELS", "PASSES", "PassOptionError", "PassReport", "PassVerificationError", "kernel_count", "optimize",
           "MemoryPlan", "liveness", "plan_memory"]
