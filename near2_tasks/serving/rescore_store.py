"""The funnel's local store: every product's full-dimension vector as float16 and its bit codes, memory-mapped by
the search service, so that ``mode=funnel`` is at most one Elasticsearch request (the bit-code shortlist, with
filters) plus a gather and a dot product here, instead of a second request that rescores the shortlist in
Elasticsearch (``serving.funnel_rescore: local``; BENCHMARKS.md, "A float16 rescoring store on the serving host"),
and without filters no request at all (``serving.funnel_shortlist: local``: the Hamming scan runs here too).

One store per concrete index, ``<home>/rescore/<index name>/``:

* ``vectors.npy``: float16 ``(n, full dim)``, rows in the order of ``ids.npy``;
* ``ids.npy``: the product ids as UTF-8 bytes (``S<w>``), sorted, so a shortlist id finds its row by binary
  search on the memory-mapped array (no dict of n Python strings in each worker);
* ``fields.bin`` + ``offsets.npy``: each row's product fields as JSON (what Elasticsearch's ``_source`` returns
  for a hit), so the top k need no request either;
* ``codes_<d>.npy``: uint8 ``(n, d / 8)``, the 1-bit codes of every coded dimension, the very bytes the index's
  ``embedding_<d>_bits`` field holds (``compact.binary_codes`` of the float32 vectors, the index's centres), so the
  funnel's first stage can run here too (``serving.funnel_shortlist: local``, :meth:`RescoreStore.shortlist`): an
  exhaustive Hamming scan of d/8 bytes per product, then the rescoring, and no Elasticsearch request at all;
* ``store.json``: the index, its model URI, dims and document count the store was written for, and the centres
  its codes were made with (the index ``_meta``'s).

It is written at build time, by the same functions that load the index: every ``load_shard`` writes its part
(``parts/<hash of its ids>.npz``; a retried shard overwrites its own part), ``finalize_index`` merges the parts
into the store (atomically: a directory renamed into place) and removes them. Retention follows the index:
``alias.prune_indices`` deletes the stores of the indices it deletes, and stores whose index no longer exists.

A store that is missing, or does not match the index it is asked for (another model, dims, document count,
an id Elasticsearch returns that it lacks), raises :class:`StoreMismatch`; the searcher then logs it once per
index as a WARNING and rescores in Elasticsearch (the two-request funnel), so an alias swap to an index built
without a store (``funnel_rescore: elasticsearch`` at build time, or a host that does not share ``home``)
keeps answering. Verification refuses an index whose store is wrong when ``funnel_rescore`` is ``local``.

A product's score is that of the Elasticsearch field at the rescore dim: the float16 prefix, L2-normalised
again in float32 (``conventions.truncate``, as the document vector of ``embedding_<dim>`` was), compared with
the query by the field's similarity (dot_product: ``(1 + cos) / 2``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving import compact

if TYPE_CHECKING:
    import pandas as pd

    from near2_tasks.config import Settings
    from near2_tasks.serving.request import Hit

log = logging.getLogger(__name__)

STORE_DIR = "rescore"
FORMAT = 1


class StoreMismatch(Near2Error):
    """The rescoring store of an index is missing or does not belong to it."""


def store_root(settings: Settings) -> Path:
    return settings.home / STORE_DIR


def store_dir(settings: Settings, index: str) -> Path:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.+-]*", index):  # index names never hold a path separator
        raise Near2Error(f"{index!r} is not an index name")
    return store_root(settings) / index


def wanted(settings: Settings) -> bool:
    """Whether index builds write the store (``serving.funnel_rescore: local``)."""
    return settings.serving.funnel_rescore == "local"


def _fields(products: pd.DataFrame) -> list[bytes]:
    """Each product's fields as Elasticsearch's ``_source`` holds them (``bulk.documents``), JSON-encoded."""
    from near2_tasks.serving.bulk import product_source

    return [json.dumps(product_source(row), separators=(",", ":")).encode()
            for row in products.itertuples(index=False)]


def _find(keys: np.ndarray, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(row of each id in the sorted byte-string array ``keys``, whether it is there): a binary search."""
    wanted = np.array([i.encode() for i in ids], dtype=keys.dtype)
    rows = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = (keys[rows] == wanted) & np.array([len(i.encode()) <= keys.dtype.itemsize for i in ids], dtype=bool)
    return rows, found


# ----- writing --------------------------------------------------------------------------------------

def write_part(settings: Settings, index: str, products: pd.DataFrame, vectors: np.ndarray,
               centres: dict[int, np.ndarray] | None = None) -> Path:
    """One shard's rows (``products`` as prepared, their full-dimension ``vectors``) as a part of the store
    of ``index``, named by a hash of its ids: a re-run of the same shard replaces its own part. ``centres``
    (the index's bit-code centres by dimension) adds the rows' codes, as the index's bit fields get them."""
    ids = products.product_id.astype(str).tolist()
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    parts = store_dir(settings, index) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    target = parts / f"{digest}.npz"
    partial = parts / f".{digest}.{os.getpid()}.npz"
    codes = {f"codes_{d}": compact.binary_codes(np.asarray(vectors, dtype=np.float32), d, centre)
             for d, centre in (centres or {}).items()}
    np.savez(partial, vectors=np.asarray(vectors, dtype=np.float16), ids=np.array(ids, dtype=object),
             fields=np.array(_fields(products), dtype=object), **codes)
    os.replace(partial, target)
    return target


def _sources(directory: Path, merged: RescoreStore | None):
    """(ids, float16 vectors, field bytes, codes by dimension) of each source of a merge, one at a time: the
    store a previous merge wrote, then the parts (a later source wins for an id in several)."""
    if merged is not None:
        yield ([i.decode() for i in merged.ids], merged.vectors,
               [merged.fields[merged.offsets[r]:merged.offsets[r + 1]].tobytes() for r in range(merged.count)],
               merged.codes)
    for part in sorted((directory / "parts").glob("*.npz")):
        with np.load(part, allow_pickle=True) as data:
            codes = {int(name.split("_")[1]): data[name] for name in data.files if name.startswith("codes_")}
            yield [str(i) for i in data["ids"]], data["vectors"], list(data["fields"]), codes


def finalize(settings: Settings, index: str, products: pd.DataFrame, meta: dict[str, Any], count: int) -> Path:
    """Merge the parts of ``index`` into its store, for exactly the catalog's ``products`` (``count``: the
    index's document count); every product must be in a part, or in the store a previous run of this merge
    wrote (a retried finalize converges). Parts are read one at a time and the vectors written straight into
    the memory-mapped output, so the merge holds one part and the fields in memory, never the whole matrix.
    Returns the store directory."""
    from numpy.lib.format import open_memmap

    directory = store_dir(settings, index)
    try:  # a re-run of finalize: the store it merged before is a source too
        merged = RescoreStore.open(settings, index, meta.get("model_uri"), list(meta.get("dims") or [1]),
                                   len(np.load(directory / "ids.npy", mmap_mode="r")))
    except (OSError, StoreMismatch):
        merged = None
    encoded = sorted({str(p).encode() for p in products.product_id})
    keys = np.array(encoded, dtype=f"S{max(map(len, encoded), default=1)}")
    staging = store_root(settings) / f".{index}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    vectors, fields, filled = None, [b""] * len(keys), np.zeros(len(keys), dtype=bool)
    codes: dict[int, np.ndarray] | None = None  # the dims every source has codes of
    for ids, block, texts, source_codes in _sources(directory, merged) if len(keys) else ():
        rows, inside = _find(keys, ids)  # catalog ids only
        if vectors is None:
            vectors = open_memmap(staging / "vectors.npy", mode="w+", dtype=np.float16, shape=(len(keys), block.shape[1]))
            codes = {d: open_memmap(staging / f"codes_{d}.npy", mode="w+", dtype=np.uint8, shape=(len(keys), d // 8))
                     for d in source_codes}
        vectors[rows[inside]] = np.asarray(block)[inside]
        for d in list(codes or {}):
            if d in source_codes:
                codes[d][rows[inside]] = np.asarray(source_codes[d])[inside]
            else:  # a source without them (a part of an older build): this store has no codes of d
                del codes[d]
                (staging / f"codes_{d}.npy").unlink()
        for row, text, keep in zip(rows, texts, inside):
            if keep:
                fields[row] = text
        filled[rows[inside]] = True
    if vectors is None or not filled.all() or len(keys) != count:
        shutil.rmtree(staging, ignore_errors=True)
        raise Near2Error(f"the rescoring store of {index} lacks {int((~filled).sum())} of {len(keys)} products "
                         f"(index count {count}) under {directory}",
                         hint="every shard must write its part under the same home (shared storage), or set "
                              "serving.funnel_rescore: elasticsearch")
    vectors.flush()
    del vectors
    for array in (codes or {}).values():
        array.flush()
    np.save(staging / "ids.npy", keys)
    np.save(staging / "offsets.npy", np.concatenate([[0], np.cumsum([len(f) for f in fields])]).astype(np.int64))
    (staging / "fields.bin").write_bytes(b"".join(fields))
    (staging / "store.json").write_text(json.dumps({
        "format": FORMAT, "index": index, "model_uri": meta.get("model_uri"), "dims": meta.get("dims"),
        "count": len(keys), "dtype": "float16", "catalog_version": meta.get("catalog_version"),
        "codes": sorted(codes or {}), compact.META_CENTRES: (meta.get(compact.META_CENTRES) or {}) if codes else {}},
        indent=2) + "\n")
    del merged, codes  # the merged store's and the codes' mappings closed before the directories move
    old = store_root(settings) / f".{index}.old.{os.getpid()}"
    if directory.exists():
        directory.rename(old)  # the parts go with it
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    log.info("rescoring store of %s: %d products, float16, %s", index, len(keys), directory)
    return directory


# ----- retention ------------------------------------------------------------------------------------

def delete_stores(settings: Settings, indices: list[str]) -> list[str]:
    """Delete the stores of ``indices`` (those that exist); returns the names whose store was deleted."""
    deleted = []
    for index in indices:
        directory = store_dir(settings, index)
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
            deleted.append(index)
    if deleted:
        log.info("deleted the rescoring stores of %s", deleted)
    return deleted


def orphans(settings: Settings, alias: str, existing: set[str], targets: set[str]) -> list[str]:
    """Store directories of ``alias``'s indices that no longer exist, none newer than the newest of the alias
    ``targets`` (by the timestamp in the name, as pruning keeps indices: a newer one may belong to a build
    that has not created its index yet)."""
    root = store_root(settings)
    stamp = re.compile(rf"{re.escape(alias)}-v[a-z0-9_.+-]+-(\d{{8}}t\d{{6}})")
    stamps = [m.group(1) for m in map(stamp.fullmatch, targets) if m]
    if not root.is_dir() or not stamps:
        return []
    found = []
    for entry in root.iterdir():
        match = stamp.fullmatch(entry.name)
        if match and entry.name not in existing and match.group(1) <= max(stamps):
            found.append(entry.name)
    return sorted(found)


# ----- reading --------------------------------------------------------------------------------------

def _similarity(similarity: str, cos: np.ndarray) -> np.ndarray:
    """Elasticsearch's ``_score`` of unit vectors with dot product ``cos`` under the field's similarity."""
    if similarity in ("dot_product", "cosine"):
        return (1 + cos) / 2
    if similarity == "l2_norm":
        return 1 / (1 + np.maximum(2 - 2 * cos, 0))
    if similarity == "max_inner_product":
        return np.where(cos < 0, 1 / (1 - cos), cos + 1)
    raise ValueError(f"unknown similarity {similarity!r}")


@dataclass(frozen=True)
class RescoreStore:
    """An opened store: memory-mapped arrays (nothing is read until a query gathers its rows)."""

    index: str
    directory: Path
    ids: np.ndarray
    vectors: np.ndarray
    offsets: np.ndarray
    fields: np.ndarray
    #: the 1-bit codes of each coded dimension, ``(n, d / 8)`` uint8, memory-mapped (none in an older store)
    codes: dict[int, np.ndarray]
    #: the same codes by column, in RAM, made on the first scan (:meth:`code_columns`)
    _columns: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def count(self) -> int:
        return len(self.ids)

    @classmethod
    def open(cls, settings: Settings, index: str, model_uri: str, dims: list[int], count: int,
             centres: dict[int, np.ndarray] | None = None) -> RescoreStore:
        """The store of ``index``, checked against what the index says (its model, dims, document count, and the
        bit-code ``centres`` of its ``_meta``: codes made with other centres would shortlist other products);
        :class:`StoreMismatch` with the reason otherwise."""
        directory = store_dir(settings, index)
        try:
            info = json.loads((directory / "store.json").read_text())
            store = cls(index=index, directory=directory, ids=np.load(directory / "ids.npy", mmap_mode="r"),
                        vectors=np.load(directory / "vectors.npy", mmap_mode="r"),
                        offsets=np.load(directory / "offsets.npy", mmap_mode="r"),
                        fields=np.memmap(directory / "fields.bin", dtype=np.uint8, mode="r"),
                        codes={int(d): np.load(directory / f"codes_{int(d)}.npy", mmap_mode="r")
                               for d in info.get("codes") or []})
        except (OSError, ValueError) as exc:
            raise StoreMismatch(f"no readable rescoring store for index {index} at {directory}: {exc}"[:400],
                                hint="build the index with serving.funnel_rescore: local") from exc
        problems = []
        if info.get("index") != index or info.get("format") != FORMAT:
            problems.append(f"it was written for {info.get('index')} (format {info.get('format')})")
        if info.get("model_uri") != model_uri:
            problems.append(f"its model is {info.get('model_uri')}, the index's {model_uri}")
        if store.vectors.ndim != 2 or store.vectors.shape[1] < max(dims) or store.vectors.dtype != np.float16:
            problems.append(f"its vectors are {store.vectors.dtype} {store.vectors.shape}, need float16 "
                            f"(n, {max(dims)})")
        if not (store.count == count == len(store.vectors) == len(store.offsets) - 1):
            problems.append(f"it holds {store.count} ids and {len(store.vectors)} vectors, the index {count} documents")
        written = compact.meta_centres(info)  # store.json records them under the _meta key
        for d, codes in store.codes.items():
            if codes.dtype != np.uint8 or codes.shape != (store.count, d // 8):
                problems.append(f"its {d}-bit codes are {codes.dtype} {codes.shape}, need uint8 ({store.count}, {d // 8})")
            if centres is not None and d in centres and (d not in written or written[d].shape != centres[d].shape
                                                         or not np.allclose(written[d], centres[d], atol=1e-6)):
                problems.append(f"its {d}-bit codes were made with other centres than the index's")
        if problems:
            raise StoreMismatch(f"the rescoring store at {directory} does not match index {index}: "
                                + "; ".join(problems), hint="rebuild the index (near2 index)")
        return store

    def rows_of(self, ids: list[str]) -> np.ndarray:
        """Row of each id; :class:`StoreMismatch` when one is not in the store."""
        rows, found = _find(self.ids, ids)
        lost = ~found
        if lost.any():
            raise StoreMismatch(f"the rescoring store of {self.index} lacks product(s) "
                                f"{[i for i, gone in zip(ids, lost) if gone][:3]} that the index returned")
        return rows

    def code_columns(self, dim: int) -> list[np.ndarray]:
        """The ``dim``-bit codes as contiguous columns of 64-bit words (of bytes where ``dim`` is not a multiple
        of 64), in RAM: ``dim / 8`` bytes per product, read once from the memory-mapped file. A column at a time
        the scan runs on contiguous arrays: at 2M products XOR + popcount took 3.5 ms this way against 14 ms
        for XOR alone on the row-major ``(n, 2)`` words, and the row sum 27 ms more (BENCHMARKS.md)."""
        columns = self._columns.get(dim)
        if columns is None:
            codes = self.codes[dim]
            words = codes.view(np.uint64) if dim % 64 == 0 else codes
            columns = self._columns[dim] = [np.ascontiguousarray(words[:, j]) for j in range(words.shape[1])]
        return columns

    def shortlist(self, code: np.ndarray, dim: int, size: int) -> np.ndarray:
        """The rows of the ``size`` codes nearest to the query's ``code`` (uint8, ``dim / 8`` bytes) by Hamming
        distance, nearest first, as the kNN on ``embedding_<dim>_bits`` ranks them; ties go to the lower row
        (products sorted by id). One pass over ``dim / 8`` bytes per product (:meth:`code_columns`): XOR and
        popcount a column at a time, a histogram of the distances for the cut-off (no sort of n), then a sort of
        the shortlist only."""
        code = np.ascontiguousarray(code, dtype=np.uint8)
        if code.shape != (dim // 8,):
            raise ValueError(f"a {dim}-bit code has {dim // 8} bytes, got shape {code.shape}")
        words = code.view(np.uint64) if dim % 64 == 0 else code
        columns = self.code_columns(dim)
        distance = np.bitwise_count(columns[0] ^ words[0]).astype(np.uint8 if dim < 256 else np.uint16)
        for column, word in zip(columns[1:], words[1:]):
            distance += np.bitwise_count(column ^ word)
        if size >= len(distance):
            return np.lexsort((np.arange(len(distance)), distance))
        below = np.cumsum(np.bincount(distance, minlength=dim + 1))
        cut = int(np.searchsorted(below, size))  # the distance at which the shortlist fills
        rows = np.flatnonzero(distance < cut)
        rows = np.concatenate([rows, np.flatnonzero(distance == cut)[:size - len(rows)]])
        return rows[np.argsort(distance[rows], kind="stable")]

    def top(self, ids: list[str], full_vector, dim: int, k: int, similarity: str = "dot_product"
            ) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the best ``k`` of ``ids``, their scores), best first, scored at ``dim`` as the
        ``embedding_<dim>`` field would score them; ties keep the shortlist's order."""
        return self.top_rows(self.rows_of(ids), full_vector, dim, k, similarity)

    def top_rows(self, rows: np.ndarray, full_vector, dim: int, k: int, similarity: str = "dot_product"
                 ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`top` for shortlisted ``rows`` of the store. The cosine of each re-normalised prefix is its dot
        product over its norm: one float16 -> float32 conversion of the gathered rows, no normalised copy (a third
        of the time of ``conventions.truncate`` on them; the same scores up to float32 rounding)."""
        prefixes = np.asarray(self.vectors[rows, :dim], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", prefixes, prefixes))
        cos = (prefixes @ conventions.truncate(full_vector, dim)) / np.where(norms == 0, 1.0, norms)
        scores = _similarity(similarity, cos)
        order = np.argsort(-scores, kind="stable")[:k]
        return rows[order], scores[order]

    def hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """The hits of ``rows``: the product fields from the store, Elasticsearch's float32 ``_score`` rounding."""
        from near2_tasks.serving.request import Hit

        out = []
        for row, score in zip(rows, scores):
            source = json.loads(self.fields[self.offsets[row]:self.offsets[row + 1]].tobytes())
            out.append(Hit(product_id=source["product_id"], title=source.get("title", ""),
                           score=float(np.float32(score)), category=source.get("category"),
                           brand=source.get("brand"), price=source.get("price")))
        return out


class StoreCache:
    """The stores a long-lived searcher rescores with, by index name (the last few: an alias swap brings a new
    one, a rollback the old one back). A store that is missing or does not match is logged as a WARNING when it
    is found so and re-tried every :attr:`RETRY_S` seconds (a WARNING each time it still fails), never per request."""

    RETRY_S = 30.0
    KEEP = 4

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stores: OrderedDict[str, tuple[RescoreStore | StoreMismatch, float]] = OrderedDict()
        self._lock = threading.Lock()
        #: funnel requests rescored in Elasticsearch although ``serving.funnel_rescore`` is local
        self.fallbacks = 0

    def get(self, index: str, model_uri: str, dims: list[int], count: Callable[[], int],
            centres: dict[int, np.ndarray] | None = None) -> RescoreStore | None:
        """The matching store of ``index`` (``count()``: its document count, asked only when the store is
        opened), or None: then the caller rescores in Elasticsearch."""
        with self._lock:
            entry = self._stores.get(index)
            if entry is None or (isinstance(entry[0], StoreMismatch) and time.monotonic() - entry[1] >= self.RETRY_S):
                try:
                    opened: RescoreStore | StoreMismatch = RescoreStore.open(self.settings, index, model_uri, dims,
                                                                             count(), centres)
                    log.info("mode=funnel on %s rescores locally from %s", index, opened.directory)
                except StoreMismatch as exc:
                    log.warning("mode=funnel on %s rescores in Elasticsearch (a second request): %s", index, exc)
                    opened = exc
                entry = self._stores[index] = (opened, time.monotonic())
                while len(self._stores) > self.KEEP:
                    self._stores.popitem(last=False)
            self._stores.move_to_end(index)
            if isinstance(entry[0], RescoreStore):
                return entry[0]
            self.fallbacks += 1
            return None

    def failed(self, index: str, exc: StoreMismatch) -> None:
        """A store that opened but then lacked a product the index returned: not used again until re-tried."""
        log.warning("mode=funnel on %s rescores in Elasticsearch (a second request): %s", index, exc)
        with self._lock:
            self._stores[index] = (exc, time.monotonic())
            self.fallbacks += 1
