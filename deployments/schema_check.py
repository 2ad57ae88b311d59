"""Strict key checking of Serve configs against Ray's own pydantic schema models.

Ray's ``ServeDeploySchema`` silently ignores unknown keys, so a misspelled ``num_replica`` or
``min_replica`` deploys with defaults. :func:`unknown_keys` walks a config dict alongside the schema
model (``ray.serve.schema.ServeDeploySchema`` for a whole file, ``AutoscalingConfig`` for one block...)
and lists every key no model field (or alias) accepts. Free-form fields (``args``, ``runtime_env``,
``user_config``) are not descended into; ``args`` are checked by the app's own ``AppArgs``.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from pydantic import BaseModel


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _field_for(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key == name or key == field.alias:
            return field
    return None


def unknown_keys(data: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """Dotted paths of the keys in ``data`` that ``model`` (recursively) does not define.

    Parameters
    ----------
    data : dict
        A config (parsed YAML) meant for ``model``.
    model : type[pydantic.BaseModel]
        The schema model (pydantic v2).
    path : str
        Prefix of the reported paths.

    Returns
    -------
    list[str]
        E.g. ``["applications[0].deployments[1].num_replica"]``; empty when every key is known.
    """
    if not isinstance(data, dict):
        return []
    problems: list[str] = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        field = _field_for(model, str(key))
        if field is None:
            problems.append(where)
            continue
        problems += _walk(value, field.annotation, where)
    return problems


def _walk(value: Any, annotation: Any, path: str) -> list[str]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _walk(value, args[0], path)
    if _is_model(annotation):
        return unknown_keys(value, annotation, path)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, dict):
            candidates = [a for a in args if _is_model(a)]
            if candidates:
                # The member the value fits best (fewest unknown keys).
                return min((unknown_keys(value, a, path) for a in candidates), key=len)
        if isinstance(value, list):
            for member in args:
                if typing.get_origin(member) in (list, typing.List):  # noqa: UP006
                    return _walk(value, member, path)
        return []
    if origin in (list, typing.List) and isinstance(value, list) and args:  # noqa: UP006
        problems: list[str] = []
        for i, item in enumerate(value):
            problems += _walk(item, args[0], f"{path}[{i}]")
        return problems
    return []
