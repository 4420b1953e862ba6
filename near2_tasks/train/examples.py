"""Query splits and MMSE-style multi-grained training examples from graded judgments.

Splits are by query (:func:`near2_tasks.data.text.query_key`), assigned by a seeded hash of the
query: a query's judgments never leak across train / validation / test, and a query keeps its split
when the dataset grows (a fixed threshold per query, not a cut of a sorted list).

From the graded labels of each training query (``examples`` settings, scale from ``dataset``):

* strong positives: relevance >= ``strong_positive_min`` (default 2.5 on the 1-3 scale; None: its top);
* weak positives: ``relevant_threshold`` <= relevance < strong;
* hard negatives: judged, relevance < ``hard_negative_max`` (default 1.67; None: ``relevant_threshold``);
* model-mined hard negatives (optional, ``model=``): judged-low products the current model ranks in
  its top ``mined_top_k``; with ``mined_unjudged_as_negatives`` also *unjudged* top-ranked products
  (after skipping ``mined_skip_top``), which is an assumption and is therefore off by default;
* random negatives: ``random_negatives_per_query`` *unjudged* catalog products, assumed irrelevant
  (a standard in-catalog negative; 0 turns the assumption off).

Outputs: ``triplets`` (anchor, positive, negative) for MultipleNegativesRankingLoss, each positive
paired with the hardest negatives available (model-mined, then judged, then random), and
``pairs`` (sentence1, sentence2, label 0/1) for OnlineContrastiveLoss: positives labelled 1, every
negative labelled 0. Column names are exactly what sentence-transformers expects; per-row provenance
is in ``triplet_sources`` / ``pair_sources``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from near2_tasks.config import Settings
from near2_tasks.data.hashing import frame_hash
from near2_tasks.data.text import query_key
from near2_tasks.errors import Near2Error

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

SPLITS = ("train", "validation", "test")
JUDGMENT_HASH_COLUMNS = ["query_id", "query", "product_id", "relevance"]


# ---------------------------------------------------------------------------------------------
# splits


@dataclass
class QuerySplits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"train": self.train, "validation": self.validation, "test": self.test}

    @property
    def sizes(self) -> dict[str, dict[str, int]]:
        return {name: {"queries": int(frame["query_id"].nunique()), "judgments": len(frame)}
                for name, frame in self.frames().items()}

    @property
    def hashes(self) -> dict[str, str]:
        return {name: frame_hash(frame, JUDGMENT_HASH_COLUMNS) for name, frame in self.frames().items()}

    def summary(self) -> dict[str, Any]:
        return {"seed": self.seed, "fractions": list(self.fractions), "sizes": self.sizes, "hashes": self.hashes}


def split_bucket(key: str, seed: int) -> float:
    """A query's position in [0, 1): a seeded SHA-256 of its key (stable across machines and runs)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_query(judgments: pd.DataFrame, seed: int = 13,
                   fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> QuerySplits:
    """Train / validation / test judgments; every query's rows land in exactly one split."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise Near2Error(f"split fractions must be three non-negative numbers summing to 1, got {fractions}",
                         hint="e.g. examples.split_fractions: [0.8, 0.1, 0.1]")
    keys = [query_key(q) for q in judgments["query"]]
    buckets = {k: split_bucket(k, seed) for k in set(keys)}
    edges = (fractions[0], fractions[0] + fractions[1])
    names = np.array(["train" if buckets[k] < edges[0] else "validation" if buckets[k] < edges[1] else "test"
                      for k in keys], dtype=object)
    parts = {name: judgments[names == name].reset_index(drop=True) for name in SPLITS}
    return QuerySplits(parts["train"], parts["validation"], parts["test"], seed, tuple(fractions))


def configured_splits(settings: Settings, judgments: pd.DataFrame) -> QuerySplits:
    """:func:`split_by_query` with the configured seed and fractions: the split every stage and benchmark uses."""
    return split_by_query(judgments, settings.examples.seed, tuple(settings.examples.split_fractions))


# ---------------------------------------------------------------------------------------------
# mining


@dataclass
class TrainingExamples:
    triplets: pd.DataFrame  # anchor, positive, negative
    pairs: pd.DataFrame  # sentence1, sentence2, label (0/1)
    counts: dict[str, int]
    triplet_sources: pd.DataFrame = field(default_factory=pd.DataFrame)  # query_id, positive_id, negative_id, kinds
    pair_sources: pd.DataFrame = field(default_factory=pd.DataFrame)  # query_id, product_id, kind


def _grade_bounds(settings: Settings) -> tuple[float, float]:
    ds, ex = settings.dataset, settings.examples
    strong = ex.strong_positive_min if ex.strong_positive_min is not None else ds.relevance_max
    hard = ex.hard_negative_max if ex.hard_negative_max is not None else ds.relevant_threshold
    if strong < ds.relevant_threshold:
        raise Near2Error(f"examples.strong_positive_min {strong} is below dataset.relevant_threshold "
                         f"{ds.relevant_threshold}", hint="a strong positive must be relevant")
    if strong > ds.relevance_max:
        raise Near2Error(f"examples.strong_positive_min {strong} is above dataset.relevance_max {ds.relevance_max}: "
                         "no judged product could be a strong positive",
                         hint="the default 2.5 is for the 1-3 scale; set examples.strong_positive_min on your scale")
    if hard > ds.relevant_threshold:
        raise Near2Error(f"examples.hard_negative_max {hard} is above dataset.relevant_threshold "
                         f"{ds.relevant_threshold}", hint="a relevant product must never be a negative")
    return strong, hard


def model_top_k(model: SentenceTransformer, queries: list[str], product_vectors: np.ndarray, k: int,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's top-k products by the model's cosine similarity against the normalised
    ``product_vectors``: (their row indices, their scores, best first; the query vectors), rows: queries."""
    from near2_tasks.models.embeddings import encode

    query_vectors = encode(model, queries, batch_size=batch_size)
    k = min(k, len(product_vectors))
    top = np.empty((len(queries), k), dtype=np.int64)
    top_scores = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), 256):
        scores = query_vectors[start:start + 256] @ product_vectors.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
        top[start:start + 256] = np.take_along_axis(part, order, axis=1)
        top_scores[start:start + 256] = np.take_along_axis(scores, top[start:start + 256], axis=1)
    return top, top_scores, query_vectors


def _resolve_model(model: Any, model_key: str | None, settings: Settings) -> tuple[Any, str | None]:
    """A reference becomes the encoder ``model.backend`` asks for (exported once when missing)."""
    if not isinstance(model, str):
        return model, model_key
    from near2_tasks.models.backends import load_inference_encoder
    from near2_tasks.models.embeddings import MINILM_ALIASES
    from near2_tasks.models.refs import BASE_MODEL_CACHE_KEY

    key = model_key or (BASE_MODEL_CACHE_KEY if model in MINILM_ALIASES else None)
    return load_inference_encoder(settings, model, missing="export"), key


def _sample_unjudged(rng: random.Random, product_ids: list[str], judged: set[str], count: int,
                     taken: set[str]) -> list[str]:
    picked: list[str] = []
    if len(product_ids) <= len(judged) + len(taken):
        return picked
    for _ in range(count * 50):
        if len(picked) == count:
            break
        pid = product_ids[rng.randrange(len(product_ids))]
        if pid not in judged and pid not in taken and pid not in picked:
            picked.append(pid)
    return picked


def _mined_negatives(ranked: np.ndarray, scores: np.ndarray, product_ids: list[str], graded: dict[str, float],
                     hard_max: float, ceiling: float | None, ex: Any) -> list[tuple[str, str]]:
    """A query's model-mined negatives from its ``ranked`` products: judged-low ones, optionally unjudged
    ones scored at most ``ceiling`` (the relative margin under the query's positives)."""
    found: list[tuple[str, str]] = []
    skipped = 0
    for index, score in zip(ranked, scores):
        pid = product_ids[index]
        if pid in graded:
            if graded[pid] < hard_max:
                found.append((pid, "mined_negative"))
        elif ex.mined_unjudged_as_negatives:
            if skipped < ex.mined_skip_top:
                skipped += 1
            elif ceiling is None or score <= ceiling:
                found.append((pid, "mined_unjudged_negative"))
        if len(found) == ex.mined_negatives_per_query:
            break
    return found


def _mine_with_model(model: Any, model_key: str | None, product_vectors: np.ndarray | None, settings: Settings,
                     queries: pd.DataFrame, grades: dict[str, dict[str, float]], product_ids: list[str],
                     text_of: dict[str, str], hard_max: float) -> dict[str, list[tuple[str, str]]]:
    """Each query's model-mined negatives (query id -> (product id, kind)), from the model's top products.

    An unjudged product (``mined_unjudged_as_negatives``) must score at most ``(1 - mined_relative_margin)``
    times the query's best-scored strong positive, in the spirit of ``relative_margin`` in
    ``sentence_transformers.util.mine_hard_negatives`` (per query here, not per pair): a product the model
    puts as close to the query as its best positive is likely relevant too, not a negative."""
    ex = settings.examples
    encoder, key = _resolve_model(model, model_key, settings)
    texts = [text_of[pid] for pid in product_ids]
    vectors = product_vectors
    if vectors is None and key:
        from near2_tasks.models.embeddings import encode_cached

        cache = ex.embedding_cache_dir or settings.home / "cache" / "embeddings"
        vectors = encode_cached(encoder, key, texts, cache, batch_size=settings.model.encode_batch_size)
    if vectors is None:
        from near2_tasks.models.embeddings import encode

        vectors = encode(encoder, texts, batch_size=settings.model.encode_batch_size)
    top, top_scores, query_vectors = model_top_k(encoder, queries["query"].tolist(), vectors, ex.mined_top_k,
                                                 settings.model.encode_batch_size)
    row_of = {pid: row for row, pid in enumerate(product_ids)}
    strong_min = _grade_bounds(settings)[0]
    mined = {}
    for row, qid in enumerate(queries.index):
        ceiling = None
        if ex.mined_unjudged_as_negatives and ex.mined_relative_margin is not None:
            positives = [row_of[pid] for pid, rel in grades[qid].items() if rel >= strong_min]
            if positives:
                ceiling = float((vectors[positives] @ query_vectors[row]).max()) * (1 - ex.mined_relative_margin)
        mined[qid] = _mined_negatives(top[row], top_scores[row], product_ids, grades[qid], hard_max, ceiling, ex)
    return mined


class _ExampleRows:
    """The triplets and pairs being built, their provenance, and the counts of the examples report."""

    def __init__(self, text_of: dict[str, str], ex: Any, missing_products: int) -> None:
        self.text_of, self.ex = text_of, ex
        self.counts = {k: 0 for k in ("queries", "queries_without_positive", "strong_positives", "weak_positives",
                                      "hard_negatives", "mined_negatives", "mined_unjudged_negatives",
                                      "random_negatives", "positives_without_negative")}
        self.counts["judgments_without_product"] = missing_products
        self.triplets: list[tuple[str, str, str]] = []
        self.triplet_sources: list[tuple[str, str, str, str, str]] = []
        self.pairs: list[tuple[str, str, int]] = []
        self.pair_sources: list[tuple[str, str, str]] = []

    def add_query(self, qid: str, query: str, strong: list[str], weak: list[str],
                  negatives: list[tuple[str, str]]) -> None:
        """One query's triplets (each anchor with its next negatives, round-robin) and labelled pairs."""
        counts, text_of = self.counts, self.text_of
        counts["queries"] += 1
        counts["strong_positives"] += len(strong)
        counts["weak_positives"] += len(weak)
        for _, kind in negatives:
            counts[kind + "s"] += 1
        if not strong and not weak:
            counts["queries_without_positive"] += 1
        anchors = [(pid, "strong_positive") for pid in strong]
        if self.ex.weak_positives_in_triplets:
            anchors += [(pid, "weak_positive") for pid in weak]
        for position, (pid, kind) in enumerate(anchors):
            if not negatives:
                counts["positives_without_negative"] += 1
                continue
            for j in range(min(self.ex.negatives_per_positive, len(negatives))):
                neg, neg_kind = negatives[(position + j) % len(negatives)]
                self.triplets.append((query, text_of[pid], text_of[neg]))
                self.triplet_sources.append((qid, pid, neg, kind, neg_kind))
        for pid, kind in [(p, "strong_positive") for p in strong] + [(p, "weak_positive") for p in weak]:
            self.pairs.append((query, text_of[pid], 1))
            self.pair_sources.append((qid, pid, kind))
        for pid, kind in negatives:
            self.pairs.append((query, text_of[pid], 0))
            self.pair_sources.append((qid, pid, kind))

    def examples(self) -> TrainingExamples:
        counts = self.counts
        triplet_frame = pd.DataFrame(self.triplets, columns=["anchor", "positive", "negative"], dtype=object)
        pair_frame = pd.DataFrame(self.pairs, columns=["sentence1", "sentence2", "label"])
        pair_frame["label"] = pair_frame["label"].astype(int)
        counts["triplets"] = len(triplet_frame)
        counts["pairs"] = len(pair_frame)
        counts["pairs_positive"] = int(pair_frame["label"].sum())
        counts["pairs_negative"] = counts["pairs"] - counts["pairs_positive"]
        return TrainingExamples(
            triplet_frame, pair_frame, counts,
            pd.DataFrame(self.triplet_sources, columns=["query_id", "positive_id", "negative_id", "positive_kind",
                                                        "negative_kind"]),
            pd.DataFrame(self.pair_sources, columns=["query_id", "product_id", "kind"]),
        )


def mine_examples(products: pd.DataFrame, train_judgments: pd.DataFrame, settings: Settings,
                  model: SentenceTransformer | str | None = None, model_key: str | None = None,
                  product_vectors: np.ndarray | None = None) -> TrainingExamples:
    """Triplets and labelled pairs from the training split (see module doc); deterministic per seed.

    ``model`` (a loaded encoder or a reference for :func:`near2_tasks.models.embeddings.load_encoder`) turns
    on model-mined hard negatives; ``model_key`` caches its product embeddings on disk, and
    ``product_vectors`` (the model's normalised vectors of ``products``, row for row) skips encoding
    the catalog when a caller already has them.
    """
    if product_vectors is not None and len(product_vectors) != len(products):
        raise Near2Error(f"product_vectors has {len(product_vectors)} rows for {len(products)} products",
                         hint="pass the vectors of exactly these products, in the same order")
    ex = settings.examples
    strong_min, hard_max = _grade_bounds(settings)
    rng = random.Random(ex.seed)
    product_ids = products["product_id"].astype(str).tolist()
    text_of = dict(zip(product_ids, products["text"].tolist()))
    judged_rows = train_judgments[train_judgments["product_id"].isin(text_of)]

    queries = judged_rows.groupby("query_id", sort=True).agg(query=("query", "first"))
    grades = {qid: dict(zip(g["product_id"], g["relevance"])) for qid, g in judged_rows.groupby("query_id")}
    mined_for: dict[str, list[tuple[str, str]]] = {}
    if model is not None and ex.mined_negatives_per_query > 0 and len(queries):
        mined_for = _mine_with_model(model, model_key, product_vectors, settings, queries, grades, product_ids,
                                     text_of, hard_max)

    rows = _ExampleRows(text_of, ex, len(train_judgments) - len(judged_rows))
    for qid, query in queries["query"].items():
        graded = grades[qid]
        ordered = sorted(graded.items(), key=lambda item: (-item[1], item[0]))
        strong = [pid for pid, rel in ordered if rel >= strong_min]
        weak = [pid for pid, rel in ordered if settings.dataset.relevant_threshold <= rel < strong_min]
        mined = mined_for.get(qid, [])
        mined_ids = {pid for pid, _ in mined}
        hard = [pid for pid, rel in ordered[::-1] if rel < hard_max and pid not in mined_ids]
        randoms = _sample_unjudged(rng, product_ids, set(graded), ex.random_negatives_per_query, mined_ids)
        negatives = ([(pid, kind) for pid, kind in mined if kind == "mined_negative"]
                     + [(pid, "hard_negative") for pid in hard]
                     + [(pid, kind) for pid, kind in mined if kind == "mined_unjudged_negative"]
                     + [(pid, "random_negative") for pid in randoms])
        rows.add_query(qid, query, strong, weak, negatives)
    return rows.examples()


# ---------------------------------------------------------------------------------------------
# evaluation data and files


def ir_eval_data(products: pd.DataFrame, judgments: pd.DataFrame, threshold: float
                 ) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(queries, corpus, relevant_docs) for sentence-transformers' InformationRetrievalEvaluator.

    The corpus is the whole catalog (retrieval is over every product, not only judged ones); only
    queries with at least one product at relevance >= ``threshold`` are included.
    """
    corpus = dict(zip(products["product_id"].astype(str), products["text"]))
    relevant = judgments[(judgments["relevance"] >= threshold) & judgments["product_id"].astype(str).isin(corpus)]
    relevant_docs: dict[str, set[str]] = {}
    for qid, pid in zip(relevant["query_id"], relevant["product_id"].astype(str)):
        relevant_docs.setdefault(str(qid), set()).add(pid)
    first_text = judgments.groupby("query_id", sort=True)["query"].first()
    queries = {str(qid): text for qid, text in first_text.items() if str(qid) in relevant_docs}
    return queries, corpus, relevant_docs


def write_examples(output_dir: str | Path, splits: QuerySplits, examples: TrainingExamples,
                   extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write splits, triplets, pairs and a manifest (sizes, hashes, counts) as Parquet + JSON."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    tables = {**{f"{name}_judgments": frame for name, frame in splits.frames().items()},
              "triplets": examples.triplets, "pairs": examples.pairs,
              "triplet_sources": examples.triplet_sources, "pair_sources": examples.pair_sources}
    for name, frame in tables.items():
        path = output_dir / f"{name}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(path)
        paths[name] = path
    manifest = {**(extra or {}), "splits": splits.summary(), "counts": examples.counts,
                "examples_hash": {"triplets": frame_hash(examples.triplets, ["anchor", "positive", "negative"]),
                                  "pairs": frame_hash(examples.pairs, ["sentence1", "sentence2", "label"])}}
    paths["manifest"] = output_dir / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return paths
