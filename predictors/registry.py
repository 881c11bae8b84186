"""Predictors registered by name; adding one is a new module with @register_predictor plus a test."""

from __future__ import annotations

import importlib
import pkgutil

from predictors.base import Predictor

_REGISTRY: dict[str, type[Predictor]] = {}


def register_predictor(name: str):
    def deco(cls: type[Predictor]) -> type[Predictor]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


# modules of the package that hold no predictor (commands and helpers)
_NOT_PREDICTORS = {"base", "registry", "__main__", "views", "split", "metrics", "artifact", "evaluate", "train",
                   "report", "synthetic"}


def _load_all() -> None:
    import predictors

    for mod in pkgutil.iter_modules(predictors.__path__):
        if mod.name not in _NOT_PREDICTORS and not mod.name.startswith("_"):
            importlib.import_module(f"predictors.{mod.name}")


def available_predictors() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def make_predictor(name: str, **params) -> Predictor:
    """A new predictor. `artifact="path.npz"` loads a trained one instead (predictors.artifact; its header is
    then at `predictor.artifact_header`, and `name` must match the artifact's predictor)."""
    _load_all()
    if "artifact" in params:
        from predictors.artifact import load_artifact

        path = params.pop("artifact")
        predictor, head = load_artifact(path)
        if head["predictor"] != name:
            raise ValueError(f"{path}: artifact of predictor {head['predictor']!r}, not {name!r}")
        if params:
            raise ValueError(f"{path}: no other parameters may be given with an artifact, got {sorted(params)}")
        predictor.artifact_header = head
        return predictor
    if name not in _REGISTRY:
        raise ValueError(f"unknown predictor {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**params)
