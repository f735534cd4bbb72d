"""The configuration reference: every key of the pipeline config, with its type, bounds, default and
description, as docs/configuration.md's Markdown table (``utilrag config``) or as JSON Schema
(``utilrag config --schema``). Read from the schema in ``utilrag.config``; nothing written by hand."""

from __future__ import annotations

import re
import types
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from utilrag.config import PipelineConfig


def _section(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The model a field holds (unwrapping ``X | None``), and whether it is a list of them."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    many = get_origin(annotation) is list
    if many:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, many
    return None


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a) for a in kept)
        return f"{text} or null" if len(kept) < len(args) else text
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin is list:
        inner = _type_text(args[0])
        return (
            "list of sections" if inner == "section" else f"list of ({inner})" if " " in inner else f"list of {inner}"
        )
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = {"gt": "> {}", "ge": "≥ {}", "lt": "< {}", "le": "≤ {}", "min_length": "≥ {} items"}


def _field_type(field: FieldInfo) -> str:
    bounds = [
        form.format(getattr(m, attr))
        for m in field.metadata
        for attr, form in _BOUNDS.items()
        if getattr(m, attr, None) is not None
    ]
    return ", ".join([_type_text(field.annotation), *bounds])


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""  # a section: its keys follow
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, ``<name>`` outside code spans escaped (not an HTML tag)."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()))
    return "".join(p if p.startswith("`") else re.sub(r"<(?=[A-Za-z])", r"\\<", p) for p in parts).replace("|", "\\|")


def _reference_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        rows.append((f"`{key}`", _field_type(field), _default_text(field), field.description or ""))
        section = _section(field.annotation)
        if section is not None:
            sub, many = section
            rows.extend(_reference_rows(sub, f"{key}[]." if many else f"{key}."))
    return rows


def config_reference() -> str:
    """Every key of the pipeline config as a Markdown table: dotted key (list items as
    ``pools[].dataset``), type with bounds, default, description (docs/configuration.md)."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in _reference_rows(PipelineConfig)]
    return "\n".join(lines) + "\n"


def config_json_schema() -> dict[str, Any]:
    """The pipeline config's JSON Schema (with every key's description)."""
    return PipelineConfig.model_json_schema()
