"""Frozen dataclasses registered as JAX pytrees whose tree structure names their class.

Why not `jax.tree_util.register_dataclass` or `flax.struct.dataclass`: with jaxlib 0.10.2
the PyTreeDefs of two *different* registered dataclasses with the same number of fields
compare equal (their hashes differ; the field names and the class are ignored by `==`).
jit's cache is a hash table that calls `==` on a partial hash match, so now and then a
call with one class runs the trace compiled for the other: one jit called on 3000
one-field classes gave another class's result for 473 of them, and CI once got the
gradient of `misspec.worst_wrong(0.25)` for `misspec.top_wrong(0.25)`. Nodes registered
with `register_pytree_with_keys` (what this module does) compare by class, as they must
(tests/test_pytree.py pins both facts).

    @rubrax.pytree.dataclass
    class Batch:
        tokens: jax.Array
        width: int = rubrax.pytree.field(static=True, default=0)  # part of the tree structure

Static fields (`field(static=True)`, or metadata {"static": True}) are hashable aux
data: two instances that differ in one are different trees (a new trace under jit).
Instances get `.replace(**changes)`. Unflattening does not call `__init__` or
`__post_init__` (jax transformations rebuild nodes from tracers and placeholders).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def field(*, static: bool = False, **kwargs: Any) -> Any:
    """A dataclass field; static=True keeps it out of the leaves (it is tree structure)."""
    metadata = dict(kwargs.pop("metadata", None) or {})
    if static:
        metadata["static"] = True
    return dataclasses.field(metadata=metadata, **kwargs)


def _replace(self: T, **changes: Any) -> T:
    return dataclasses.replace(self, **changes)


def dataclass(cls: type[T]) -> type[T]:
    """Make `cls` a frozen dataclass and register it as a pytree (leaves: its non-static
    fields, in declaration order; aux data: its static fields)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    if any(not f.init for f in fields):
        raise TypeError(f"rubrax.pytree.dataclass: {cls.__qualname__} has init=False fields, which a pytree cannot rebuild")
    data = tuple(f.name for f in fields if not f.metadata.get("static"))
    meta = tuple(f.name for f in fields if f.metadata.get("static"))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def flatten(obj):
        return tuple(getattr(obj, name) for name in data), tuple(getattr(obj, name) for name in meta)

    def flatten_with_keys(obj):
        children, aux = flatten(obj)
        return tuple(zip(keys, children)), aux

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for name, value in zip(data, children):
            object.__setattr__(obj, name, value)
        for name, value in zip(meta, aux):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    if "replace" not in cls.__dict__:
        cls.replace = _replace
    return cls
