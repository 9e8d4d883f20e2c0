"""Optional dependency groups (pyproject's extras) and the one line a user sees when one is missing."""

from __future__ import annotations

# The top-level modules each extra installs (starlette comes with fastapi). Core code imports them only
# inside the functions that need them, so `import mergegate` never pulls them.
EXTRA_MODULES = {
    "serve": ("fastapi", "starlette", "uvicorn", "httpx", "opentelemetry", "prometheus_client"),
    "report": ("matplotlib",),
    "ray": ("ray",),
    "search": ("optuna",),
    "gguf": ("gguf",),
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that would have installed the module `exc` could not import, or None if no extra does."""
    top = (exc.name or "").partition(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def install_hint(extra: str) -> str:
    return f"pip install 'mergegate[{extra}]'"
