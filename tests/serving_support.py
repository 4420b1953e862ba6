"""Helpers shared by the serving tests (index, search, service)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from near2_tasks.config import Settings
from near2_tasks.data.synthetic import generate_catalog


def with_sections(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """``settings`` with some fields of some sections replaced, validated like any configuration."""
    data = settings.model_dump()
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return Settings(**data)


def serving_settings(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """Test-sized serving settings: small retries and backoff, the alias re-read on every query."""
    base = {
        "elasticsearch": {"bulk_chunk_size": 50, "max_retries": 1, "bulk_max_retries": 2,
                          "bulk_initial_backoff_s": 0.05, "bulk_max_backoff_s": 0.2, "verify_sample_size": 10,
                          **sections.pop("elasticsearch", {})},
        "serving": {"alias_check_interval_s": 0, "funnel_shortlist_size": 20, **sections.pop("serving", {})},
    }
    return with_sections(settings, **base, **sections)


def titled_catalog(n: int, seed: int = 3) -> pd.DataFrame:
    """A synthetic catalog whose embedded text is the title, so a product's own title is its exact
    document vector (random tiny encoders carry no meaning beyond that)."""
    products = generate_catalog(n, 10, seed=seed).products
    return products.assign(text=products.title)


def module_settings(tmp_path_factory, es_url: str, model: str, dims: list[int], home: str = "search-home") -> Settings:
    """Serving settings for a test module's shared index: its own home and alias, ``model`` at ``dims``."""
    import uuid

    from near2_tasks.config import load_settings

    alias = f"test-products-{uuid.uuid4().hex[:8]}"
    return serving_settings(load_settings(
        home=str(tmp_path_factory.mktemp(home)), elasticsearch={"url": es_url, "alias": alias},
        model={"base_model": model, "dims": dims}))
