"""The one YAML reader of the package (benchmark files, ``--config`` files, a run's ``config.yaml``, values on
the command line): PyYAML's safe loader with limits, so that a hostile or mistaken file is refused in one line
instead of exhausting memory, and a key written twice is an error instead of the last one silently winning.

* ``MAX_BYTES``: a settings or benchmark file lists settings and tasks (records live in their own files);
  anything larger is not one.
* ``MAX_NODES``: values after every alias is expanded; a few nested aliases can otherwise stand for billions
  of values (an "alias bomb") that any code walking the result would exhaust memory on.
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, SequenceNode

MAX_BYTES = 4 * 1024 * 1024
MAX_NODES = 100_000


class YAMLRefused(yaml.YAMLError):
    """A YAML text over a limit, or with a key written twice; ``str()`` is the one-line reason (with its line)."""


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that counts nodes (an alias counts as everything it stands for) and refuses duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> nodes under it, aliases expanded

    def _size(self, node) -> int:
        key = id(node)
        if key in self._sizes:
            return self._sizes[key]
        self._sizes[key] = 1  # a recursive alias (a node inside itself) counts once
        if isinstance(node, SequenceNode):
            size = 1 + sum(self._size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
        else:
            size = 1
        self._sizes[key] = size
        return size

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        self._nodes += self._size(node) if alias else 1
        if self._nodes > MAX_NODES:
            raise YAMLRefused(f"line {mark.line + 1}: more than {MAX_NODES:,} values once its aliases are expanded "
                              "(an alias bomb?); refused")
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}  # key -> the line it was first written on
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise YAMLRefused(f"line {line}: duplicate key {key!r} (first at line {seen[key]}); "
                                          "write each key once")
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor below names it
                    continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str | bytes) -> Any:
    """Parse one YAML document safely; raises ``YAMLRefused`` (a ``yaml.YAMLError``) over a limit or on a
    duplicate key, other ``yaml.YAMLError`` s for invalid YAML."""
    if len(text) > MAX_BYTES:
        raise YAMLRefused(f"{len(text):,} bytes, more than the {MAX_BYTES // (1024 * 1024)} MiB a settings or "
                          "benchmark file may hold; refused")
    loader = _LimitedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
