"""Verification of a loaded index before it may serve (ARCHITECTURE.md invariant 1): the document count
is the catalog's, every dimension answers, a sample of products retrieve themselves; a pass is marked in
``_meta.verified_at``."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving import compact, rescore_store
from near2_tasks.serving.alias import mapping_of, meta_of
from near2_tasks.serving.index import load_meta_model, prepare_products
from near2_tasks.serving.es_client import es_errors, item_reason, make_client

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)



class IndexVerificationFailed(Near2Error):
    """The new index is not fit to serve; the alias was not touched."""

    exit_code = 1

    def __init__(self, message: str, report: VerificationReport) -> None:
        super().__init__(message, hint="the alias still points at the previous index; fix the cause and re-run")
        self.report = report


@dataclass
class VerificationReport:
    index: str
    expected_count: int
    actual_count: int
    dims: list[int]
    sample_size: int
    top_k: int
    self_hit_rate: dict[int, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def verify_index(settings: Settings, index_name: str, products: pd.DataFrame,
                 model: SentenceTransformer | None = None, *, client: Elasticsearch | None = None
                 ) -> VerificationReport:
    """Check an index is fit to serve, then mark it verified in ``_meta``.

    Checks: the ``_meta`` keys; document count == accepted catalog rows; with ``serving.funnel_rescore: local``
    the index's rescoring store matches it (:mod:`near2_tasks.serving.rescore_store`); every dimension answers a
    kNN query; a sample of products find themselves in the top k by their own text, encoded by the
    model named in ``_meta`` (or ``model``, the same weights already loaded). Raises
    IndexVerificationFailed (alias untouched) with the report when a check fails.
    """
    from near2_tasks.models.embeddings import encode

    es = settings.elasticsearch
    products = prepare_products(products, settings.dataset.text_template)
    client = client or make_client(settings)
    with es_errors(es.url, f"verification of {index_name}"):
        if not client.indices.exists(index=index_name):
            raise Near2Error(f"index {index_name} does not exist", hint="`near2 index status` lists the indices")
        meta = meta_of(client, index_name)
        dims = [int(d) for d in meta.get("dims") or []]
        client.indices.refresh(index=index_name)
        actual = client.count(index=index_name)["count"]
        top_k = es.verify_top_k
        report = VerificationReport(index=index_name, expected_count=len(products), actual_count=actual,
                                    dims=dims, sample_size=min(es.verify_sample_size, len(products)),
                                    top_k=top_k)
        missing = [key for key in conventions.INDEX_META_KEYS if key not in meta]
        if missing:
            report.problems.append(f"_meta lacks {missing}")
        if actual != len(products):
            report.problems.append(f"index holds {actual} documents, the catalog has {len(products)} accepted rows")
        mapped = mapping_of(client, index_name)["properties"]
        unmapped = [d for d in dims if conventions.vector_field(d) not in mapped]
        if unmapped or not dims:
            report.problems.append(f"dims {unmapped or dims} have no vector field")
        if rescore_store.wanted(settings) and dims:  # serving.funnel_rescore: local needs the index's own store
            centres = compact.meta_centres(meta)
            try:
                store = rescore_store.RescoreStore.open(settings, index_name, meta.get("model_uri"), dims, actual,
                                                        centres)
                lacking = sorted(set(centres) - set(store.codes))
                if lacking and settings.serving.funnel_shortlist == "local":  # the no-request funnel needs them
                    report.problems.append(f"the rescoring store of {index_name} has no {lacking}-bit codes "
                                           "(serving.funnel_shortlist: local)")
            except rescore_store.StoreMismatch as exc:
                report.problems.append(exc.message)
        if not report.problems:
            model = model or load_meta_model(settings, meta["model_uri"])
            rng = np.random.default_rng(0)
            sample = products.iloc[np.sort(rng.choice(len(products), report.sample_size, replace=False))]
            queries = encode(model, sample.text.tolist(), batch_size=settings.model.encode_batch_size)
            for dim in dims:
                hits = _knn_batch(client, index_name, dim, conventions.truncate(queries, dim), top_k,
                                  max(top_k, es.num_candidates))
                if not any(hits):
                    report.problems.append(f"embedding_{dim} answered no kNN query")
                    continue
                found = sum(pid in ids for pid, ids in zip(sample.product_id, hits))
                rate = found / len(sample)
                report.self_hit_rate[dim] = round(rate, 4)
                if rate < es.verify_min_self_hit_rate:
                    report.problems.append(
                        f"at dim {dim} only {found}/{len(sample)} sampled products retrieve themselves in the "
                        f"top {top_k} (need {es.verify_min_self_hit_rate:.0%}): was the index built with "
                        f"{meta.get('model_uri')}?")
        if report.problems:
            raise IndexVerificationFailed(f"index {index_name} failed verification: "
                                          + "; ".join(report.problems), report)
        client.indices.put_mapping(index=index_name, meta={
            **meta, conventions.META_VERIFIED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return report


def _knn_batch(client, index: str, dim: int, vectors: np.ndarray, k: int, num_candidates: int) -> list[list[str]]:
    """Product ids of the kNN top k for each query vector, in one msearch round trip."""
    searches: list[dict[str, Any]] = []
    for vector in vectors:
        searches.append({"index": index})
        searches.append({"knn": {"field": conventions.vector_field(dim), "query_vector": vector.tolist(), "k": k,
                                 "num_candidates": num_candidates}, "size": k, "_source": False})
    responses = client.msearch(searches=searches)["responses"]
    results = []
    for response in responses:
        if "error" in response:
            raise Near2Error(f"kNN on embedding_{dim} of {index} failed: {item_reason(response['error'])}")
        results.append([hit["_id"] for hit in response["hits"]["hits"]])
    return results

