"""Gate-aware merge search: recipes drawn from a space (search.space), trials on Ray (search.ray_tasks,
search.trial), scored as the gate would score their release, the best released on held-out rows (search.run)."""

from .run import HeldOut, SearchOptions, SearchResult, TrialRecord, objective_values, search
from .space import Space, load_space

__all__ = ["HeldOut", "SearchOptions", "SearchResult", "Space", "TrialRecord", "load_space", "objective_values",
           "search"]
