"""KWNG checkpoints: ``state_dict`` and an atomic ``load_state_dict`` (everything checked first)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ._state import _Ratio, _Refresh


def state_dict(kwng, include_cache: bool = True) -> dict:
    """:meth:`KWNG.state_dict`."""
    kwng._flush()
    r = kwng._ratio
    state = {
        "step": kwng._step,
        "eps_scale": kwng._eps_scale,
        "eps": kwng.current_eps(),
        "num_fallbacks": kwng.num_fallbacks,
        "num_skipped": kwng.num_skipped,
        "num_short_batches": kwng.num_short_batches,
        "ratio": {"prev_loss": r.prev_loss, "prev_gw": r.prev_gw, "prev_lr": r.prev_lr,
                  "r_max": r.r_max, "count": r.count},
        "rng": kwng._draws.get_state(),
        "hyperparameters": {"lam": kwng._value(kwng.lam, "lam", False),
                            "clip_norm": kwng._value(kwng.clip_norm, "clip_norm", True),
                            "lr": kwng._current_lr(), "num_basis": kwng.num_basis,
                            "refresh_every": kwng.refresh_every},
        "cache": None,
    }
    c = kwng._cache
    if include_cache and c is not None:
        state["cache"] = {"t_white": c.t_white.clone(),
                          "damping": None if c.damping is None else c.damping.clone(),
                          "active": list(c.active), "step": c.step}
    return state


def load_state_dict(kwng, state: dict) -> None:
    """:meth:`KWNG.load_state_dict`: every field checked, then committed."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict from KWNG.state_dict(); got {type(state).__name__}")
    missing = [k for k in ("step", "eps_scale", "num_fallbacks", "num_skipped", "ratio", "rng",
                           "hyperparameters") if k not in state]
    if missing:
        raise ValueError(f"state is missing {', '.join(map(repr, missing))}: not a KWNG.state_dict()")
    state = copy.deepcopy(state)
    hyper = state["hyperparameters"]
    saved_m = hyper.get("num_basis") if isinstance(hyper, dict) else None
    if saved_m is not None and saved_m != kwng.num_basis:
        raise ValueError(f"state was saved with num_basis={saved_m}; this KWNG has num_basis="
                         f"{kwng.num_basis}: load it into a KWNG built with num_basis={saved_m}")
    r = state["ratio"]
    if not isinstance(r, dict) or not {"prev_loss", "prev_gw", "prev_lr", "r_max", "count"} <= set(r):
        raise ValueError("state['ratio'] must hold prev_loss, prev_gw, prev_lr, r_max and count")
    step = _state_count(state["step"], "step")
    ratio = _Ratio(*(_state_real(r[k], f"ratio.{k}") for k in ("prev_loss", "prev_gw", "prev_lr")),
                   _state_real(r["r_max"], "ratio.r_max", False), _state_count(r["count"], "ratio.count"))
    eps_scale = _state_real(state["eps_scale"], "eps_scale", False)
    if not (math.isfinite(eps_scale) and eps_scale > 0):
        raise ValueError(f"state['eps_scale'] must be a finite number > 0; got {eps_scale!r}")
    counts = [_state_count(state[k], k) for k in ("num_fallbacks", "num_skipped")]
    short = _state_count(state.get("num_short_batches", 0), "num_short_batches")
    source = kwng._draws.restored(state["rng"])
    cache = _checked_cache(kwng, state.get("cache"), step)
    # everything checked: commit (a sync_free state on the device is superseded)
    kwng._dev = None
    kwng._step, kwng._ratio, kwng._eps_scale = step, ratio, eps_scale
    kwng.num_fallbacks, kwng.num_skipped = counts
    kwng.num_short_batches = short
    kwng._draws.adopt(source)
    kwng._pending = None
    kwng._cache = cache


def _checked_cache(kwng, c, step: int):
    """The cache of a state, on the parameters' device, after checking it fits these parameters."""
    if c is None:
        return None
    if not isinstance(c, dict) or not {"t_white", "damping", "active", "step"} <= set(c):
        raise ValueError("state['cache'] must be None or hold t_white, damping, active and step")
    active = c["active"]
    if (not isinstance(active, (list, tuple)) or not active
            or not all(isinstance(i, int) and 0 <= i < len(kwng._params) for i in active)):
        raise ValueError(f"state['cache']['active'] must list indices of this KWNG's {len(kwng._params)} "
                         f"parameters; got {active!r}: the state comes from other parameters")
    q = sum(kwng._params[i].numel() for i in active)
    tw, dmp = c["t_white"], c["damping"]
    if (not isinstance(tw, torch.Tensor) or tw.ndim != 2 or not 1 <= tw.shape[0] <= kwng.num_basis
            or tw.shape[1] != q or not tw.is_floating_point()):
        got = tuple(tw.shape) if isinstance(tw, torch.Tensor) else type(tw).__name__
        raise ValueError(f"state['cache']['t_white'] must be a floating (M, q) tensor with M <= "
                         f"num_basis = {kwng.num_basis} and q = {q} (the cached parameters' size); got "
                         f"{got}: the state comes from other parameters")
    if dmp is not None and (not isinstance(dmp, torch.Tensor) or tuple(dmp.shape) != (q,)):
        raise ValueError(f"state['cache']['damping'] must be None or a ({q},) tensor")
    cache_step = _state_count(c["step"], "cache.step")
    if cache_step > step:
        raise ValueError(f"state['cache']['step'] = {cache_step} is after state['step'] = {step}")
    dev = kwng._params[0].device
    return _Refresh(tw.to(dev), None if dmp is None else dmp.to(dev), tuple(active), cache_step)


def _state_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"state['{name}'] must be an int >= 0; got {value!r}")
    return int(value)


def _state_real(value, name: str, none_ok: bool = True) -> float | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"state['{name}'] must be a number{' or None' if none_ok else ''}; got {value!r}")
    return float(value)
