"""KWNG's options: the parameters it preconditions and the hyperparameters that may be schedules."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._backend import check_positive_scalar

Schedule = float | Callable[[int], float]


def _collect_params(params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of tensors or of dicts with a 'params' key (as for torch.optim); "
            "got a bare Tensor: pass model.parameters() or [tensor]"
        )
    try:
        items = list(params)
    except TypeError:
        got = type(params).__name__
        raise TypeError(f"params must be an iterable of tensors or dicts; got {got}") from None
    flat: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, dict):
            if "params" not in item:
                raise ValueError("a parameter group (dict) must have a 'params' key")
            ps = item["params"]
            flat.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            flat.append(item)
    if not flat:
        raise ValueError("params is empty: KWNG needs at least one parameter")
    seen = set()
    for i, p in enumerate(flat):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a Tensor; got {type(p).__name__}")
        if not p.is_leaf:
            raise ValueError(f"params[{i}] is not a leaf tensor; pass the model's parameters")
        if id(p) in seen:
            raise ValueError(f"params contains the same parameter twice (again at position {i})")
        seen.add(id(p))
    return flat


def _check_schedule(value, name: str, *, positive: bool, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if callable(value):
        return value
    try:
        return check_positive_scalar(value, name, allow_zero=not positive)
    except TypeError:
        raise TypeError(f"{name} must be a float or a callable of the step; got {value!r}") from None
