"""A learned gate among adapters on one shared base: per request, the base's mean last hidden state over the prompt
(adapters off) → a linear layer → softmax weights over the choices (each adapter, and the base alone), and the
request is answered with the top choice (top-1: one adapter's LoRA per request, no merged deltas).

Trained on calibration rows only (`{"text": ..., "cohort": ...}`, the calibration file's format; never the suite):
a row's label is the adapter its cohort's route names (`routes`: cohort → adapter), the base alone for a cohort with
none. The features are standardised and the layer is a multinomial logistic regression (L-BFGS, L2), fitted
deterministically. Saved as `router.safetensors` (weight, bias, mean, scale) and `router.json` (the choices, the
base's and the adapters' folders relative to the router's, what it was trained on); `AdapterRouter.load` reads it
back and picks the same choices."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import EvaluationError

FORMAT = "mergegate.adapter_router/1"
FEATURE = "base mean last hidden state over the prompt"
BASE_CHOICE = "(base)"  # the choice that answers with the base alone


@dataclass(frozen=True)
class AdapterRouter:
    """Softmax(weight · (features − mean) / scale + bias) over `choices` (adapter names, or BASE_CHOICE)."""

    choices: tuple[str, ...]
    weight: torch.Tensor  # (choices, hidden)
    bias: torch.Tensor  # (choices,)
    mean: torch.Tensor  # (hidden,)
    scale: torch.Tensor  # (hidden,)
    base: Path
    adapters: dict[str, Path]
    trained_on: dict[str, Any]

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """(n, choices) softmax weights for (n, hidden) features."""
        return torch.softmax(((features - self.mean) / self.scale) @ self.weight.T + self.bias, dim=-1)

    def pick(self, features: torch.Tensor) -> list[str | None]:
        """The adapter each row is answered with (None: the base alone)."""
        chosen = [self.choices[int(i)] for i in self.weights(features).argmax(dim=-1)]
        return [None if choice == BASE_CHOICE else choice for choice in chosen]

    def identity(self) -> str:
        """A hash of what decides a pick: the choices and the tensors (part of an evaluation's model hash)."""
        digest = hashlib.sha256(json.dumps(self.choices).encode())
        for tensor in (self.weight, self.bias, self.mean, self.scale):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save(self, folder: Path) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias, "mean": self.mean, "scale": self.scale},
                  str(folder / "router.safetensors"))
        relative = {name: _relative(path, folder) for name, path in self.adapters.items()}
        (folder / "router.json").write_text(json.dumps(
            {"format": FORMAT, "feature": FEATURE, "choices": list(self.choices), "base": _relative(self.base, folder),
             "adapters": relative, "trained_on": self.trained_on}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> AdapterRouter:
        """A saved router; anything missing or malformed raises EvaluationError naming the file."""
        from safetensors.torch import load_file

        folder = Path(folder)
        where = folder / "router.json"
        try:
            meta = json.loads(where.read_text())
            tensors = load_file(str(folder / "router.safetensors"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            choices = tuple(meta["choices"])
            router = cls(choices, tensors["weight"], tensors["bias"], tensors["mean"], tensors["scale"],
                         (folder / meta["base"]).resolve(),
                         {name: (folder / path).resolve() for name, path in meta["adapters"].items()},
                         meta.get("trained_on", {}))
            if router.weight.shape[0] != len(choices) or set(choices) - {BASE_CHOICE} - set(router.adapters):
                raise ValueError("its choices do not match its weights or its adapters")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EvaluationError(f"adapter router {where}: cannot be read: {exc}") from None
        return router


def _relative(path: Path, folder: Path) -> str:
    import os

    return os.path.relpath(Path(path).absolute(), folder.absolute())


def load_labelled_calibration(path: str | Path) -> list[tuple[str, str]]:
    """(text, cohort) per row of a calibration file whose rows name their cohort; refuses a row without one."""
    from ..calibration import _row_text
    from ..errors import RecipeError

    path, rows = Path(path), []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"calibration file {path}: cannot be read ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = _row_text(line, path, number)
        except RecipeError as exc:
            raise EvaluationError(str(exc)) from None
        cohort = json.loads(line).get("cohort")
        if not isinstance(cohort, str) or not cohort:
            raise EvaluationError(f"calibration file {path}, line {number}: a router's rows need a 'cohort' string")
        rows.append((text, cohort))
    if not rows:
        raise EvaluationError(f"calibration file {path}: holds no rows")
    return rows


def fit_router(features: torch.Tensor, cohorts: Sequence[str], base: Path, adapters: Mapping[str, Path],
               routes: Mapping[str, str], trained_on: dict[str, Any], *, l2: float = 1e-2,
               steps: int = 200) -> AdapterRouter:
    """Fit a router to (n, hidden) prompt features whose rows' cohorts are `cohorts` (module docstring)."""
    unknown = sorted(set(routes.values()) - set(adapters))
    if unknown:
        raise EvaluationError(f"router: routes name adapter(s) {', '.join(unknown)} not among {', '.join(adapters)}")
    choices = tuple(dict.fromkeys([*adapters, *([BASE_CHOICE] if any(c not in routes for c in cohorts) else [])]))
    labels = torch.tensor([choices.index(routes.get(cohort, BASE_CHOICE)) for cohort in cohorts])
    mean, scale = features.mean(dim=0), features.std(dim=0).clamp(min=1e-6)
    standard = (features - mean) / scale
    weight = torch.zeros(len(choices), features.shape[1], requires_grad=True)
    bias = torch.zeros(len(choices), requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(standard @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    return AdapterRouter(choices, weight.detach().clone(), bias.detach().clone(), mean, scale, Path(base),
                         {name: Path(path) for name, path in adapters.items()},
                         {**trained_on, "routes": dict(routes), "l2": l2})
