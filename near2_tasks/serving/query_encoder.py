"""Query encoders of the search service: the model named in the served index's ``_meta``, loaded once per
model URI (and inference backend) and shared by every :class:`near2_tasks.serving.search.Searcher` of the
process (an LRU of ``serving.encoder_cache_size`` models), the torch thread count a query is encoded with,
and the :class:`EncodeBatcher` that encodes the queries waiting at the same moment in one call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

#: (model URI, device, backend, quantize, precision): what makes two loaded encoders differ
EncoderKey = tuple[str, str, str, str, str]

# One loaded encoder per key, shared by every Searcher in the process; its batchers beside it, keyed by
# (encoder key, max batch) and dropped with the encoder when the LRU evicts it.
_ENCODERS: OrderedDict[EncoderKey, SentenceTransformer] = OrderedDict()
_BATCHERS: dict[tuple[EncoderKey, int], EncodeBatcher] = {}
_ENCODERS_LOCK = threading.Lock()


def _encoder_key(settings: Settings, model_uri: str) -> EncoderKey:
    from near2_tasks.models.backends import resolved_backend

    cfg = settings.model
    return (model_uri, cfg.device, resolved_backend(cfg), cfg.quantize, cfg.precision)


def encoder_for(settings: Settings, model_uri: str) -> SentenceTransformer:
    """The query encoder for ``model_uri``, loaded once (LRU of ``serving.encoder_cache_size`` models)."""
    from near2_tasks.models.backends import load_inference_encoder

    key = _encoder_key(settings, model_uri)
    backend = key[2]
    with _ENCODERS_LOCK:
        if key in _ENCODERS:
            _ENCODERS.move_to_end(key)
            return _ENCODERS[key]
        # never export at request time: without the backend's artefact, serve the fp32 model (warned).
        # torch threads are set per request (torch_threads); an exported backend gets its own at load.
        threads = None if backend == "torch" else settings.serving.encode_threads
        model = load_inference_encoder(settings, model_uri, missing="torch", threads=threads)
        _ENCODERS[key] = model
        while len(_ENCODERS) > settings.serving.encoder_cache_size:
            evicted, _ = _ENCODERS.popitem(last=False)
            for batcher_key in [k for k in _BATCHERS if k[0] == evicted]:
                del _BATCHERS[batcher_key]
        return model


def batcher_for(settings: Settings, model_uri: str) -> EncodeBatcher:
    """The :class:`EncodeBatcher` of :func:`encoder_for`'s model, taking up to ``serving.encode_batch_size``
    queries per call: one per loaded encoder (and batch size), shared by the process, so concurrent requests
    of every searcher batch together."""
    model = encoder_for(settings, model_uri)
    key = (_encoder_key(settings, model_uri), settings.serving.encode_batch_size)
    with _ENCODERS_LOCK:
        batcher = _BATCHERS.get(key)
        if batcher is None or batcher.model is not model:
            batcher = EncodeBatcher(model, settings.serving.encode_batch_size)
            # kept only while its encoder is: a model evicted since encoder_for returned it gets a one-off
            # batcher (correct, it just batches with no one), never a cache entry that outlives the model
            if _ENCODERS.get(key[0]) is model:
                _BATCHERS[key] = batcher
        return batcher


@dataclass(eq=False)
class _Pending:
    """One caller's text and, once a batch has encoded it, its vector or the batch's error."""

    text: str
    vector: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class EncodeBatcher:
    """Group commit for query encodes: the queries waiting at the same moment are encoded in one call.

    Why: the service encodes each request's query in its own threadpool thread. One text per call pays
    the model's fixed cost per query, and under 16 concurrent clients on 2 cores those calls contend for
    the cores. Per query, OpenVINO bf16 MiniLM on 1 thread took 3.66 ms at batch 1, 1.99 ms at batch 4,
    1.66 at 8 and 1.51 at 16: encoding the queries that wait together in one call roughly halves the CPU
    per query.

    How (no extra thread, no timer): a caller appends its text to a FIFO queue, then takes the encode lock.
    Holding it, until its own text is done, it encodes up to ``max_batch`` texts from the front of the
    queue in one call and hands each its row. The texts that queued while another caller was encoding go
    in the next call; a caller that gets the lock and finds its text already encoded returns at once. A
    lone caller therefore encodes its single text straight away, exactly as without the batcher: batches
    form only when callers actually wait, i.e. under load.

    Every caller gets the vector of its own text (batching pads to the longest text, which mean pooling
    masks out: equal to a one-text encode up to float rounding), as its own contiguous float32 array. An
    exception while encoding a batch is raised to every caller of that batch; later calls go on.
    Thread-safe; torch's thread count is the caller's (``torch_threads`` around :meth:`encode`).
    """

    def __init__(self, model: SentenceTransformer, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._queue_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        #: encode calls made, and texts they encoded (encoded / batches: the mean batch size)
        self.batches = 0
        self.encoded = 0

    @property
    def pending(self) -> int:
        """Texts queued and not yet taken into a batch."""
        with self._queue_lock:
            return len(self._queue)

    def encode(self, text: str) -> np.ndarray:
        """The full-dimension, L2-normalised vector of ``text`` (see
        :func:`near2_tasks.models.embeddings.encode`), encoded together with the texts waiting beside it."""
        item = _Pending(text)
        with self._queue_lock:
            self._queue.append(item)
        with self._encode_lock:
            while not item.done:
                self._encode_next_batch()
        if item.error is not None:
            raise item.error
        assert item.vector is not None
        return item.vector

    def _encode_next_batch(self) -> None:
        """Encode up to ``max_batch`` texts from the front of the queue (caller holds the encode lock).
        Every item taken is marked done, with its vector or the error: a caller whose item was taken by
        someone else must never wait for it again."""
        from near2_tasks.models.embeddings import encode

        with self._queue_lock:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        if not batch:  # unreachable while every caller queues before it encodes; never spin on it
            raise RuntimeError("EncodeBatcher: a pending text is neither queued nor encoded")
        self.batches += 1
        self.encoded += len(batch)
        try:
            vectors = encode(self.model, [item.text for item in batch], batch_size=len(batch))
            if len(vectors) != len(batch):
                raise RuntimeError(f"the encoder returned {len(vectors)} vectors for {len(batch)} texts")
            for item, row in zip(batch, vectors):
                item.vector = np.array(row, dtype=np.float32)  # a copy: each caller owns its vector
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            for item in batch:
                item.error = exc
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: the encoding caller stops too
                raise
        finally:
            for item in batch:
                item.done = True


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads, then restore. One query is too small to split: with the
    default thread pool it took ~840 ms instead of ~37 ms on a busy 2-core host (BENCHMARKS.md)."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
