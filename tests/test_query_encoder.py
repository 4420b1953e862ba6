"""The search service's query encoders: the group-commit :class:`EncodeBatcher` and its wiring.

No Elasticsearch: the batcher is driven directly with the tiny encoder, and ``Searcher.query_vector`` with a
stand-in client that is never called. Batches are made deterministic by a model whose first encode call
blocks until every other caller has queued (no timing assertions).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from near2_tasks.models.embeddings import encode, load_encoder
from near2_tasks.serving import query_encoder
from near2_tasks.serving.query_encoder import EncodeBatcher, batcher_for, encoder_for

# different lengths, so a batch pads most of them
TEXTS = ["drill", "cordless drill 18v", "outdoor patio furniture set with cushions", "led bulb",
         "stainless steel kitchen sink undermount double bowl", "garden hose", "paint roller 9 in",
         "pvc pipe", "ceiling fan with light and remote control", "door knob", "wood screws 2 inch box of 100",
         "water heater"]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_encoder(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def single_vectors(tiny_model) -> dict[str, np.ndarray]:
    """What a one-text encode gives for each text: the reference every batched vector must equal."""
    return {text: encode(tiny_model, [text], batch_size=1)[0] for text in TEXTS}


@dataclass
class RecordingModel:
    """The tiny encoder behind the ``encode_normalized`` hook of ``embeddings.encode``: records each call's
    batch size, can hold its first call until released, and can fail."""

    model: object
    sizes: list[int] = field(default_factory=list)
    hold_first: bool = False
    fail_with: type[Exception] | None = None
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def encode_normalized(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.sizes.append(len(texts))  # calls are serialised by the batcher's encode lock
        first = not self.started.is_set()
        self.started.set()
        if first and self.hold_first:
            assert self.release.wait(60), "the test never released the first encode"
        if self.fail_with is not None:
            raise self.fail_with("encoder failed")
        return encode(self.model, texts, batch_size=batch_size)


@dataclass
class Outcome:
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def encode_together(call: Callable[[str], np.ndarray], texts: list[str], recorder: RecordingModel | None = None,
                    queued: Callable[[], int] | None = None) -> Outcome:
    """``call`` each text from its own thread, all released at once by a barrier. With ``recorder`` holding
    its first encode, that call is released only once every other text is queued (``queued()`` of them), so
    the rest must form batches."""
    barrier = threading.Barrier(len(texts))
    outcome = Outcome()

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcome.vectors[i] = call(texts[i])
        except Exception as exc:  # noqa: BLE001 - asserted by the test
            outcome.errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    if recorder is not None and recorder.hold_first:
        assert queued is not None
        wait_until(recorder.started.is_set, "the first encode started")
        wait_until(lambda: queued() == len(texts) - recorder.sizes[0], "every other caller queued")
        recorder.release.set()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a caller never returned"
    return outcome


def test_concurrent_callers_share_batches_and_each_gets_its_own_vector(tiny_model, single_vectors):
    recorder = RecordingModel(tiny_model, hold_first=True)
    batcher = EncodeBatcher(recorder, max_batch=16)
    outcome = encode_together(batcher.encode, TEXTS, recorder, lambda: batcher.pending)

    assert not outcome.errors
    for i, text in enumerate(TEXTS):
        vector = outcome.vectors[i]
        assert vector.dtype == np.float32 and vector.shape == single_vectors[text].shape
        assert vector.flags.c_contiguous and vector.flags.owndata  # its own array, not a view of the batch
        np.testing.assert_allclose(vector, single_vectors[text], atol=1e-5, err_msg=text)
    # the held first call took what was queued then; everything that queued behind it went in one more call
    assert sum(recorder.sizes) == len(TEXTS) and len(recorder.sizes) <= 2 < len(TEXTS), recorder.sizes
    assert (batcher.batches, batcher.encoded, batcher.pending) == (len(recorder.sizes), len(TEXTS), 0)


def test_batches_never_exceed_max_batch_and_stay_in_order(tiny_model, single_vectors):
    recorder = RecordingModel(tiny_model, hold_first=True)
    batcher = EncodeBatcher(recorder, max_batch=3)
    outcome = encode_together(batcher.encode, TEXTS, recorder, lambda: batcher.pending)

    assert not outcome.errors
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(outcome.vectors[i], single_vectors[text], atol=1e-5, err_msg=text)
    assert sum(recorder.sizes) == len(TEXTS) and max(recorder.sizes) <= 3
    assert len(recorder.sizes) < len(TEXTS), recorder.sizes


def test_one_caller_at_a_time_encodes_each_text_alone(tiny_model, single_vectors):
    recorder = RecordingModel(tiny_model)
    batcher = EncodeBatcher(recorder, max_batch=16)
    for text in TEXTS[:5]:
        np.testing.assert_allclose(batcher.encode(text), single_vectors[text], atol=1e-5)
    assert recorder.sizes == [1] * 5
    assert (batcher.batches, batcher.encoded) == (5, 5)


class EncoderBroke(RuntimeError):
    pass


def test_an_encode_error_reaches_every_caller_of_its_batch_and_later_calls_work(tiny_model, single_vectors):
    recorder = RecordingModel(tiny_model, hold_first=True, fail_with=EncoderBroke)
    batcher = EncodeBatcher(recorder, max_batch=16)
    texts = TEXTS[:8]
    outcome = encode_together(batcher.encode, texts, recorder, lambda: batcher.pending)

    assert not outcome.vectors and sorted(outcome.errors) == list(range(len(texts)))
    assert all(type(error) is EncoderBroke for error in outcome.errors.values())
    assert max(recorder.sizes) > 1, recorder.sizes  # some batch had several callers, and all of them got it
    assert batcher.pending == 0

    recorder.fail_with = None
    np.testing.assert_allclose(batcher.encode(TEXTS[-1]), single_vectors[TEXTS[-1]], atol=1e-5)
    assert recorder.sizes[-1] == 1


def test_a_batcher_needs_a_positive_batch_size(tiny_model):
    with pytest.raises(ValueError, match="max_batch"):
        EncodeBatcher(tiny_model, max_batch=0)


# ----- wiring: settings, the shared batchers, Searcher.query_vector ------------------------------------------


@pytest.fixture
def fresh_encoders(monkeypatch):
    """Empty process-wide encoder and batcher caches for the test (restored after it)."""
    monkeypatch.setattr(query_encoder, "_ENCODERS", type(query_encoder._ENCODERS)())
    monkeypatch.setattr(query_encoder, "_BATCHERS", {})


def serving_settings(tmp_path, model_dir, **serving):
    from near2_tasks.config import load_settings

    return load_settings(home=str(tmp_path / "home"), model={"base_model": str(model_dir), "backend": "torch",
                                                             "device": "cpu"}, serving=serving)


def test_the_batcher_is_shared_per_encoder_and_goes_with_it(tmp_path, tiny_model_dir, second_tiny_model_dir,
                                                             fresh_encoders):
    settings = serving_settings(tmp_path, tiny_model_dir, encoder_cache_size=1)
    assert settings.serving.encode_batch_size == 16
    first = batcher_for(settings, str(tiny_model_dir))
    assert first is batcher_for(settings, str(tiny_model_dir)) and first.max_batch == 16
    assert first.model is encoder_for(settings, str(tiny_model_dir))

    other = batcher_for(settings, str(second_tiny_model_dir))  # evicts the first encoder, and its batcher
    assert other.model is not first.model
    assert list(query_encoder._BATCHERS) == [(query_encoder._encoder_key(settings, str(second_tiny_model_dir)), 16)]
    reloaded = batcher_for(settings, str(tiny_model_dir))
    assert reloaded is not first and reloaded.model is encoder_for(settings, str(tiny_model_dir))


def searcher_over(settings, model: RecordingModel | None = None):
    """A Searcher whose client is never used, and what it serves: only ``model_uri`` matters to query_vector.
    With ``model``, every encode goes through it, batched or not."""
    from near2_tasks.serving.search import Searcher

    searcher = Searcher(settings, client=SimpleNamespace())
    if model is not None:
        batcher = EncodeBatcher(model, settings.serving.encode_batch_size)
        searcher.encoder = lambda served: model
        searcher.batcher = lambda served: batcher
    return searcher, SimpleNamespace(model_uri=settings.model.base_model)


def test_query_vector_encodes_through_the_shared_batcher(tmp_path, tiny_model_dir, single_vectors, fresh_encoders):
    settings = serving_settings(tmp_path, tiny_model_dir, query_cache_size=0)
    searcher, served = searcher_over(settings)
    outcome = encode_together(lambda text: searcher.query_vector(served, text)[0], TEXTS)

    assert not outcome.errors
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(outcome.vectors[i], single_vectors[text], atol=1e-5, err_msg=text)
    batcher = batcher_for(settings, served.model_uri)
    assert batcher.encoded == len(TEXTS) and batcher.pending == 0


def test_batch_size_one_encodes_every_query_alone(tmp_path, tiny_model_dir, tiny_model, single_vectors):
    recorder = RecordingModel(tiny_model, hold_first=True)
    batcher = EncodeBatcher(recorder, max_batch=1)
    outcome = encode_together(batcher.encode, TEXTS, recorder, lambda: batcher.pending)
    assert not outcome.errors and recorder.sizes == [1] * len(TEXTS)

    # the setting: query_vector encodes each query on its own, as it did before batching
    settings = serving_settings(tmp_path, tiny_model_dir, query_cache_size=0, encode_batch_size=1)
    recorder = RecordingModel(tiny_model)
    searcher, served = searcher_over(settings, recorder)
    outcome = encode_together(lambda text: searcher.query_vector(served, text)[0], TEXTS)

    assert not outcome.errors
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(outcome.vectors[i], single_vectors[text], atol=1e-5, err_msg=text)
    assert recorder.sizes == [1] * len(TEXTS)
