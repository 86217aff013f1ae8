"""The one reader of class maps (e.g. the official 22K -> 1K ``map22kto1k.txt``). Pure Python.

A class map relates SOURCE classes (e.g. the 21841 ImageNet-22K classes of a checkpoint head or
of dataset labels) to TARGET classes (e.g. the 1000 ImageNet-1K classes). Accepted forms:

* text file, the official format: the source index of target class 0, 1, 2, ... in order. One
  integer per line; several whitespace-separated integers on a line are read in order too; blank
  lines and ``#`` comments are ignored;
* JSON file holding a list (the same meaning as the text file: entry i = source of target i);
* JSON file holding an object ``{"source": target, ...}`` (keys are source indices as strings);
* in code: a sequence of ints (as the list) or a mapping {source: target}.

Two views of the same map, for its two users:

* :meth:`ClassMap.source_indices` -> [source of target 0, source of target 1, ...]: the rows to
  keep of a 22K head (``swinv2.weights.read_class_map``) or the logit columns to score;
* :meth:`ClassMap.label_map` -> {source: target}: relabelling 22K dataset labels to 1K.
"""
from __future__ import annotations

import json
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ClassMap", "ClassMapError", "load_class_map"]


class ClassMapError(ValueError):
    """A class map that cannot be read; the message names the file and line (or entry)."""


@dataclass(frozen=True)
class ClassMap:
    """(source, target) pairs in the order they were given; `origin` names where they came from."""

    pairs: tuple[tuple[int, int], ...]
    origin: str = "class map"

    def label_map(self) -> dict[int, int]:
        """{source: target}; a source listed twice keeps its last target (as a dict literal would)."""
        return {src: dst for src, dst in self.pairs}

    def source_indices(self, num_source: int | None = None) -> list[int]:
        """Source index of every target 0..n-1. Every target needs exactly one source; with
        `num_source`, sources must lie in [0, num_source)."""
        by_target: dict[int, int] = {}
        for src, dst in self.pairs:
            if dst in by_target:
                raise ClassMapError(f"{self.origin}: target class {dst} has two sources "
                                    f"({by_target[dst]} and {src}); a head row needs exactly one")
            by_target[dst] = src
        gaps = sorted(set(range(len(by_target))) - by_target.keys())
        if gaps:
            raise ClassMapError(f"{self.origin}: target classes must be 0..{len(by_target) - 1} without gaps; "
                                f"no source for target {gaps[0]}")
        sources = [by_target[t] for t in range(len(by_target))]
        if num_source is not None and sources and (min(sources) < 0 or max(sources) >= num_source):
            raise ClassMapError(f"{self.origin}: class_map indices must lie in [0, {num_source}); got range "
                                f"[{min(sources)}, {max(sources)}]")
        return sources


def load_class_map(source: Any) -> ClassMap:
    """Read a class map from a path (text or JSON file), a sequence of ints or a {source: target} mapping."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(os.fspath(source))
    if isinstance(source, Mapping):
        return ClassMap(_mapping_pairs(source, "class map"), "class map")
    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        return ClassMap(_list_pairs(source, "class map"), "class map")
    raise TypeError(f"class map must be a path, a sequence of ints or a mapping, got {type(source).__name__}")


def _read_file(path: str) -> ClassMap:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip()[:1] in ("[", "{"):  # JSON; anything else is the official text format
        return ClassMap(_json_pairs(text, path), path)
    return ClassMap(_text_pairs(text, path), path)


def _text_pairs(text: str, path: str) -> tuple[tuple[int, int], ...]:
    sources = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in line.split("#", 1)[0].split():
            sources.append(_as_index(token, f"{path}:{lineno}"))
    return tuple((src, dst) for dst, src in enumerate(sources))


def _json_pairs(text: str, path: str) -> tuple[tuple[int, int], ...]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClassMapError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if isinstance(obj, dict):
        return _mapping_pairs(obj, path)
    return _list_pairs(obj, path)


def _list_pairs(values: Sequence, where: str) -> tuple[tuple[int, int], ...]:
    return tuple((_as_index(v, f"{where}: entry {dst}"), dst) for dst, v in enumerate(values))


def _mapping_pairs(obj: Mapping, where: str) -> tuple[tuple[int, int], ...]:
    return tuple((_as_index(k, f"{where}: key {k!r}"), _as_index(v, f"{where}: value of key {k!r}"))
                 for k, v in obj.items())


def _as_index(value: Any, where: str) -> int:
    """A non-negative class index from an integer (numpy's too) or a decimal string; bools and
    floats are errors (a float index is a bug upstream, not something to round)."""
    if isinstance(value, bool):
        raise ClassMapError(f"{where}: not a class index: {value!r}")
    try:
        index = int(value) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        raise ClassMapError(f"{where}: not an integer: {value!r}") from None
    if index < 0:
        raise ClassMapError(f"{where}: negative class index {index}")
    return index
