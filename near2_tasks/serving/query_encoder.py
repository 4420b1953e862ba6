"""Query encoders of the search service: the model named in the served index's ``_meta``, loaded once per
model URI (and inference backend) and shared by every :class:`near2_tasks.serving.search.Searcher` of the
process (an LRU of ``serving.encoder_cache_size`` models), and the torch thread count a query is encoded with.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

# One loaded encoder per (model URI, device), shared by every Searcher in the process.
_ENCODERS: OrderedDict[tuple[str, str], SentenceTransformer] = OrderedDict()
_ENCODERS_LOCK = threading.Lock()


def encoder_for(settings: Settings, model_uri: str) -> SentenceTransformer:
    """The query encoder for ``model_uri``, loaded once (LRU of ``serving.encoder_cache_size`` models)."""
    from near2_tasks.models.backends import load_inference_encoder, resolved_backend

    cfg = settings.model
    backend = resolved_backend(cfg)
    key = (model_uri, cfg.device, backend, cfg.quantize, cfg.precision)
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
            _ENCODERS.popitem(last=False)
        return model


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
