"""A YAML loader that keeps line numbers, so errors in hand-written files (MIDI maps,
modulation presets) read ``file:line: what``. PyYAML's SafeLoader with two constructors:
mappings and sequences come back as dict/list subclasses carrying the line of the node
(``line``) and of each item (``lines``); a key given twice is an error, not a silent
overwrite. Shared by bridges (MIDI maps) and the engine (modulation presets)."""

from __future__ import annotations

from typing import Any

import yaml


class LineDict(dict):
    line = 0
    lines: dict[Any, int]


class LineList(list):
    line = 0
    lines: list[int]
    flow = False  # written inline ([a, b]) rather than as a block list


class LineLoader(yaml.SafeLoader):
    pass


def _mapping(loader: LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    d = LineDict()
    d.line, d.lines = node.start_mark.line + 1, {}
    for k_node, v_node in node.value:
        k = loader.construct_object(k_node, deep=True)
        if k in d:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {k!r}", k_node.start_mark
            )
        d[k] = loader.construct_object(v_node, deep=True)
        d.lines[k] = v_node.start_mark.line + 1
    return d


def _sequence(loader: LineLoader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(n, deep=True) for n in node.value)
    out.line, out.lines = node.start_mark.line + 1, [n.start_mark.line + 1 for n in node.value]
    out.flow = bool(node.flow_style)
    return out


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)
