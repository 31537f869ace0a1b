"""Exclusive roles: jobs only one selected plugin may do (precision, distributed,
checkpoint-io, progress-bar). A plugin declares the roles it takes in a class
attribute; two plugins taking one role are refused when the ``Trainer`` is built,
and when a plugin is registered during a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hooktrain.errors import ConfigurationError, PluginError

__all__ = [
    "ROLES_ATTRIBUTE",
    "ROLE_HINTS_ATTRIBUTE",
    "check_exclusive_roles",
    "exclusive_roles",
    "role_conflict",
]

#: The class attribute in which a plugin declares the exclusive roles it takes.
ROLES_ATTRIBUTE = "exclusive_roles"
#: Optional class attribute: role -> a sentence telling the user how to resolve a
#: conflict over that role in this plugin's favour (or without it).
ROLE_HINTS_ATTRIBUTE = "exclusive_role_hints"


def exclusive_roles(name: str, plugin: Any) -> tuple[str, ...]:
    """The exclusive roles ``plugin`` declares in its ``exclusive_roles`` attribute.

    :raises PluginError: when the attribute is not a tuple (or list) of non-empty
        strings; a bare string is refused rather than read as its letters.
    """
    declared = getattr(plugin, ROLES_ATTRIBUTE, ())
    if declared is None:
        return ()
    if isinstance(declared, str) or not isinstance(declared, tuple | list | frozenset | set):
        raise PluginError(
            f"plugin {name!r}: {ROLES_ATTRIBUTE} must be a tuple of role names, got "
            f"{declared!r} (write {ROLES_ATTRIBUTE} = ({str(declared)!r},) for one role)"
        )
    roles = tuple(declared)
    if not all(isinstance(role, str) and role.strip() for role in roles):
        raise PluginError(
            f"plugin {name!r}: every entry of {ROLES_ATTRIBUTE} must be a non-empty string, "
            f"got {declared!r}"
        )
    return roles


def role_conflict(role: str, first: tuple[str, Any], second: tuple[str, Any]) -> ConfigurationError:
    """The error for two plugins that both take ``role``: names both, the role, and
    each plugin's hint for that role (``exclusive_role_hints``) when it gives one."""
    message = (
        f"plugins {first[0]!r} and {second[0]!r} both take the exclusive role {role!r} "
        f"(their {ROLES_ATTRIBUTE}); only one selected plugin may hold a role, so select "
        f"one of them."
    )
    for name, plugin in (first, second):
        hints = getattr(plugin, ROLE_HINTS_ATTRIBUTE, None) or {}
        hint = hints.get(role) if isinstance(hints, Mapping) else None
        if hint:
            message += f" {name}: {hint}"
    return ConfigurationError(message)


def check_exclusive_roles(loaded: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Refuse two plugins of ``loaded`` (``(name, plugin)`` in list order) that take
    the same exclusive role.

    :return: each role taken, with the name of the plugin that holds it.
    :raises ConfigurationError: naming both plugins and the role, at the first clash.
    :raises PluginError: for a malformed ``exclusive_roles`` attribute.
    """
    holders: dict[str, tuple[str, Any]] = {}
    for name, plugin in loaded:
        for role in exclusive_roles(name, plugin):
            if role in holders and holders[role][1] is not plugin:
                raise role_conflict(role, holders[role], (name, plugin))
            holders[role] = (name, plugin)
    return {role: holder[0] for role, holder in holders.items()}
