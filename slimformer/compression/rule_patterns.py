"""Short `re:` patterns for recipe rules: the regex that matches exactly a set of unit names among a model's.

A recipe written with one exact-name rule per unit repeats the same spec dozens of times; the writer groups
units by spec and asks `pattern_for` for one pattern per group. Names are split at their first all-digit
dotted part (the layer index: `encoder.layer.3.output.dense` -> `encoder.layer.{}.output.dense`, 3); units
whose template appears at every layer the model has for it share `\\d+`, others list their layers, and
templates with the same prefix and layer set become one alternation of their suffixes. Faithfulness is
checked by the caller (`Recipe.from_plan` re-resolves the rules and falls back to exact names).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence


def _split(name: str) -> tuple[str, str, int | None]:
    """(prefix, suffix, layer) at the first all-digit dotted part; (name, '', None) when there is none."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), ".".join(parts[i + 1:]), int(p)
    return name, "", None


def _alternation(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


def _layer_set(layers: Sequence[int]) -> str:
    """`[035]` / `[2-4]` for single digits, else an alternation."""
    if len(layers) == 1:
        return str(layers[0])
    if layers[-1] < 10:
        if list(layers) == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
            return f"[{layers[0]}-{layers[-1]}]"
        return "[" + "".join(map(str, layers)) + "]"
    return _alternation([str(x) for x in layers])


def _dotted_alternation(names: Sequence[str]) -> str:
    """Regex for exactly these dotted names, their common leading and trailing dotted parts factored out
    (`attention.self.query`, `attention.self.key` -> `attention\\.self\\.(?:query|key)`)."""
    split = [n.split(".") for n in names]
    if len(split) == 1:
        return re.escape(names[0])
    head: list[str] = []
    while all(len(s) > len(head) + 1 for s in split) and len({s[len(head)] for s in split}) == 1:
        head.append(split[0][len(head)])
    rest = [s[len(head):] for s in split]
    tail: list[str] = []
    while all(len(s) > len(tail) + 1 for s in rest) and len({s[-1 - len(tail)] for s in rest}) == 1:
        tail.insert(0, rest[0][-1 - len(tail)])
    middle = [".".join(s[: len(s) - len(tail)]) for s in rest]
    core = _alternation([re.escape(m) for m in middle])
    return r"\.".join([*(re.escape(h) for h in head), core, *(re.escape(t) for t in tail)])


def pattern_for(selected: Iterable[str], all_names: Sequence[str]) -> str:
    """A regex (without the `re:` prefix) whose fullmatch over `all_names` is exactly `selected`.

    Parts are ordered as the names first appear in `all_names`, so the output is deterministic.
    """
    chosen = set(selected)
    order = {n: i for i, n in enumerate(all_names)}
    layers_of_template: dict[tuple[str, str], set[int]] = {}
    suffixes_of_prefix: dict[str, set[str]] = {}
    for n in all_names:
        prefix, suffix, layer = _split(n)
        if layer is not None:
            layers_of_template.setdefault((prefix, suffix), set()).add(layer)
            suffixes_of_prefix.setdefault(prefix, set()).add(suffix)
    plain: list[str] = []
    picked: dict[tuple[str, str], set[int]] = {}
    for n in sorted(chosen, key=lambda x: order.get(x, len(order))):
        prefix, suffix, layer = _split(n)
        if layer is None:
            plain.append(re.escape(n))
        else:
            picked.setdefault((prefix, suffix), set()).add(layer)
    # group templates by (prefix, layer pattern); keep first-appearance order
    groups: dict[tuple[str, str], list[str]] = {}
    for (prefix, suffix), layers in picked.items():
        if layers == layers_of_template[(prefix, suffix)]:
            lp = r"\d+"
        else:
            lp = _layer_set(sorted(layers))
        groups.setdefault((prefix, lp), []).append(suffix)
    parts = list(plain)
    for (prefix, lp), suffixes in groups.items():
        head = (re.escape(prefix) + r"\.") if prefix else ""
        if suffixes == [""]:
            parts.append(head + lp)
        elif "" not in suffixes and set(suffixes) == suffixes_of_prefix[prefix]:  # every unit of those layers
            parts.append(head + lp + r"\..+")
        elif "" in suffixes:  # a template ending at the layer number next to longer ones: list them whole
            parts += [head + lp + (r"\." + re.escape(t) if t else "") for t in suffixes]
        else:
            parts.append(head + lp + r"\." + _dotted_alternation(suffixes))
    return _alternation(parts) if len(parts) > 1 else parts[0]


def matches_exactly(pattern: str, selected: Iterable[str], all_names: Sequence[str]) -> bool:
    """Whether `pattern` fullmatches exactly the `selected` names among `all_names`."""
    rx = re.compile(pattern)
    return {n for n in all_names if rx.fullmatch(n)} == set(selected)
