"""Reward names -> reward factories, resolved lazily.

A reward is named in three ways (configs, `get_reward`, `as_reward_fn`):

    "rubric"                        a registered name
    "my_pkg.rewards:length_bonus"   an importable module and an attribute in it
    "path/to/rewards.py:fn"         a Python file (relative paths: the config's folder,
                                    then the working directory) and an attribute in it

The registry maps names to "module:attr" strings and imports a module only when one of
its rewards is asked for, so asking for a host-side reward ("rubric") never imports jax,
and the core names no module it does not own: the testbed registers its own rewards
(rubrax.sim does on import), and any package can add its own with
`register_reward("name", "pkg.module:attr")` or the `@register_reward("name")` decorator.

This module only resolves names; `rubrax.rewards.base.get_reward` builds the reward.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any

_REGISTRY: dict[str, Any] = {
    "rubric": "rubrax.rewards.rubric:RubricReward",
    "bradley_terry": "rubrax.rewards.bradley_terry:BTReward",
}


class UnknownRewardError(KeyError):
    """A reward name that names nothing; the message says what was tried."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _target_of(obj: Any) -> str | None:
    """The "module:attr" string of a factory object (a string is its own target)."""
    if isinstance(obj, str):
        return obj
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else None


def register_reward(name: str, target: str | Any | None = None) -> Any:
    """Registers a reward factory (a RewardFn class, a factory function or a TRL-style
    callable) under `name`.

    `register_reward("name", "pkg.module:attr")` registers lazily (nothing is imported);
    `@register_reward("name")` registers the decorated object. Registering the same
    target again is harmless; another target under a taken name is an error.
    """

    def add(factory: Any) -> Any:
        old = _REGISTRY.get(name)
        # the decorator on a class that is also registered by its "module:attr" string is the same reward
        if old is not None and old is not factory and _target_of(old) != _target_of(factory):
            raise ValueError(f"reward {name!r} is already registered to {old!r}")
        _REGISTRY[name] = factory
        return factory

    return add if target is None else add(target)


def available_rewards() -> list[str]:
    """The registered names (without importing any of them)."""
    return sorted(_REGISTRY)


def resolve_reward(name: str, *, base_dir: str | os.PathLike | None = None) -> Any:
    """The factory that `name` stands for: registered, "module:attr" or "file.py:attr"."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownRewardError(f"a reward name must be a non-empty string, got {name!r}")
    target = _REGISTRY.get(name, name)
    if not isinstance(target, str):
        return target
    if ":" not in target:
        raise UnknownRewardError(
            f"unknown reward {name!r}: not a registered name (registered: {', '.join(available_rewards()) or '(none)'}), "
            "and not of the form 'pkg.module:attr' or 'path/to/file.py:attr'")
    where, attr = target.rsplit(":", 1)
    module = _load_file(where, name, base_dir) if where.endswith(".py") else _import(where, name)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(a for a in dir(module) if not a.startswith("_"))
            raise UnknownRewardError(f"reward {name!r}: {where} has no attribute {attr!r} (it defines: {', '.join(public) or 'nothing'})")
        obj = getattr(obj, part)
    return obj


def _import(module: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise UnknownRewardError(f"reward {name!r}: tried to import module {module!r}: no module named {err.name!r}") from None
        raise  # the module exists but one of its own imports is missing: its traceback says which


def reward_file(path: str, base_dir: str | os.PathLike | None = None, *, name: str | None = None) -> str:
    """The absolute path of a reward file: `path` itself when absolute, else under
    `base_dir` (a config's folder), else under the working directory."""
    tried = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in dict.fromkeys([os.fspath(base_dir or "."), "."])]
    found = next((os.path.abspath(p) for p in tried if os.path.isfile(p)), None)
    if found is None:
        raise UnknownRewardError(f"reward {name or path!r}: no file {path!r} (tried {', '.join(os.path.abspath(p) for p in tried)})")
    return found


def _load_file(path: str, name: str, base_dir: str | os.PathLike | None) -> Any:
    """Imports a Python file once (cached in sys.modules under a name derived from its path)."""
    found = reward_file(path, base_dir, name=name)
    mod_name = "rubrax_user_reward_" + hashlib.sha1(found.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, found)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[mod_name]
        err.add_note(f"while loading reward file {found} (for reward {name!r})")
        raise
    return module
