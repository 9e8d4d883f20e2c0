"""The merge engine: plan a recipe into tensor jobs, then stream them to a Hugging Face folder."""

from .options import MergeOptions
from .plan import MergePlan, TensorJob, plan_merge
from .provenance import PROVENANCE_FILE
from .run import MergeResult, merge, run_merge

__all__ = ["MergeOptions", "MergePlan", "MergeResult", "PROVENANCE_FILE", "TensorJob", "merge", "plan_merge",
           "run_merge"]
