"""The one place that decides which text of a product gets embedded.

Training, evaluation and indexing must all embed the same text, or the model is trained on one
thing and served another. ``dataset.text_template`` (default ``"{title} | {brand} | {category}"``)
names the fields; a field that is missing or blank is left out *together with the literal text
before it*, so a product without a brand becomes ``"Cordless Drill | Tools > Drills"``, and a catalog
that only has titles (the Home Depot set) embeds exactly its titles.
"""

from __future__ import annotations

import math
from functools import lru_cache
from string import Formatter
from typing import Any, Mapping

import pandas as pd

from near2_tasks.errors import Near2Error

#: Fields a template may name (the canonical catalog columns).
TEMPLATE_FIELDS = ("product_id", "title", "description", "category", "brand", "attributes", "price", "updated_at")


@lru_cache(maxsize=32)
def parse_template(template: str) -> tuple[str, tuple[tuple[str, str], ...], str]:
    """Split a template into (prefix, ((separator, field), ...), suffix).

    The prefix is the literal before the first field, each later field owns the literal before it,
    and the suffix is the literal after the last field.
    """
    pieces: list[tuple[str, str]] = []
    suffix = ""
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise Near2Error(f"dataset.text_template {template!r} is not a valid template: {exc}") from exc
    for literal, field, spec, conversion in parsed:
        if field is None:
            suffix = literal
            continue
        if field not in TEMPLATE_FIELDS:
            raise Near2Error(
                f"dataset.text_template names unknown field {{{field}}}",
                hint=f"use only {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}",
            )
        if spec or conversion:
            raise Near2Error(f"dataset.text_template: field {{{field}}} must not carry a format spec")
        pieces.append((literal, field))
    if not pieces:
        raise Near2Error(f"dataset.text_template {template!r} names no field", hint="e.g. '{title} | {brand}'")
    prefix = pieces[0][0]
    pieces[0] = ("", pieces[0][1])
    return prefix, tuple(pieces), suffix


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:g}"
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value).strip()


def product_text(product: Mapping[str, Any], template: str) -> str:
    """The text embedded for one product (a dict-like with canonical column names)."""
    prefix, pieces, suffix = parse_template(template)
    out: list[str] = []
    for separator, field in pieces:
        value = _as_text(product.get(field))
        if not value:
            continue
        out.append(value if not out else separator + value)
    return prefix + "".join(out) + suffix


def product_texts(products: pd.DataFrame, template: str) -> list[str]:
    """:func:`product_text` for every row of a catalog frame, in order."""
    _, pieces, _ = parse_template(template)
    fields = [field for _, field in pieces]
    columns = {field: (products[field].tolist() if field in products.columns else [None] * len(products))
               for field in fields}
    return [product_text({field: columns[field][i] for field in fields}, template) for i in range(len(products))]


def query_key(query: str) -> str:
    """The identity of a query: case-folded, whitespace collapsed ("Cordless  Drill" == "cordless drill").

    Duplicate judgments are found, and splits are assigned, by this key, so the same query typed twice
    never ends up in two splits.
    """
    return " ".join(str(query).split()).casefold()
