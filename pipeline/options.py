"""``KEY=VALUE`` command-line options (``--dataset-option``, ``--stage-option``) as a dict.

A value is read as JSON where it parses (``num_scenes=8`` -> 8, ``flag=true`` -> True, ``ids=[1,2]`` -> a
list) and kept as a string otherwise (``version=v1.0-mini``). Shared by ``cns-cli labels``, ``cns-cli predict``
and the folder converter so that each takes the same spelling.
"""
from __future__ import annotations

import json

import click


def parse_key_values(pairs, option: str = "--dataset-option") -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; an item without ``=`` is click's one-line usage error
    naming ``option``."""
    out = {}
    for item in pairs:
        if "=" not in item:
            raise click.BadParameter(f"'{item}' is not key=value", param_hint=option)
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
