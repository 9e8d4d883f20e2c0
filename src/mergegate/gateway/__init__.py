"""mergegate.gateway: an OpenAI-compatible gateway that serves a rollout plan.

Per request: pick the cohort (X-Cohort header, metadata.cohort, a `cohort/NAME` model, or a MiniLM classifier
over the eval suite's prompts), answer with the cohort's model — falling over along its fallback chain on
errors, timeouts, open circuit breakers and failed online checks — mirror a share of traffic to the candidate
in the background, and trace every backend call with OpenTelemetry's GenAI conventions. A route with a
`strategy` answers with several models (hedge, race, vote, cascade: ensembles.py). An admin API moves
one cohort at a time (promote / roll back), recorded in the registry.

    from mergegate.gateway import create_app, serve
"""

from .app import Gateway, create_app
from .config import GatewayConfig
from .server import serve

__all__ = ["Gateway", "GatewayConfig", "create_app", "serve"]
