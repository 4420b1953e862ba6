"""Storefront capacity: ``near2 serve`` under concurrent shoppers, on loopback, against a real Elasticsearch.

    # once: a private Elasticsearch and the demo index (synthetic catalog) under a private home
    export NEAR2_HOME=$PWD/.near2 NEAR2_ELASTICSEARCH__URL=http://127.0.0.1:9256 NEAR2_LOCAL_ELASTICSEARCH__PORT=9256
    near2 es start && near2 demo
    # client levels, both query mixes, for one service configuration (its NEAR2_* settings via --env)
    .venv/bin/python bench/load_benchmark.py levels --label defaults --out bench/results/load_defaults.json
    .venv/bin/python bench/load_benchmark.py levels --label no-cache-w1 --workers 1 \\
        --env NEAR2_SERVING__QUERY_CACHE_SIZE=0 --out bench/results/load_no_cache_w1.json
    # events under load: an alias swap to another model and back, an Elasticsearch restart, a soak
    .venv/bin/python bench/load_benchmark.py swap restart --out bench/results/load_events.json
    .venv/bin/python bench/load_benchmark.py soak --soak-s 600 --out bench/results/load_soak.json

What it does: starts ``near2 serve`` (uvicorn, its own process group, on 127.0.0.1) with the environment's
settings plus ``--env``, waits for ``/health``, and drives ``GET /search?q=...&k=10`` (the storefront's
default: kNN at the full dimension, no filters) from this process with N concurrent keep-alive
connections (asyncio + aiohttp, or httpx with ``--client httpx``). Every run is bounded: each level stops
after ``--level-s`` seconds or ``--max-requests`` requests, whichever comes first, after an uncounted
``--warmup-s``; the soak after ``--soak-s``.

Query mixes (``--mixes``), from the demo's synthetic generator (``generate_catalog(1000, 20000, seed=7)``:
its queries repeat the way storefront queries do, "saw" 219 times out of 20,000):

* ``zipf``: the 6,774 distinct queries ranked by how often the generator produced them, rank r drawn with
  probability ∝ 1/r (seeded); the share of requests whose text was already sent is in the results;
* ``unique``: the distinct queries and titles of the generator at seeds 7-10 (other catalogs' model
  numbers and titles), shuffled and sent in order, one cursor across the levels: no text is sent twice
  until the pool runs out (``repeated_texts`` per level says whether it did; the observed cache hit rate
  is reported too).

Each mix runs on a freshly started service; its levels (1, 8, 16, 32 clients) follow one another on it.
With ``--rate R`` each level is paced at R requests/s in total (latency from the scheduled send time);
without it, a closed loop (each client sends again as soon as it has its answer). Per level: requests,
errors (anything but 200, or no answer), QPS, p50/p90/p99/max of the client's latency
(request sent -> body read), and where the time goes, as medians of the ``Server-Timing`` header:
``encode`` (query encoding, ~0 on a cache hit), ``search`` (Elasticsearch round trip(s) from the service)
with ``es`` (Elasticsearch's own ``took``), ``handler`` (the search as a whole), ``app`` (request in ->
response start: FastAPI validation, the threadpool hop, serialisation); client latency − ``app`` is HTTP
and transport (uvicorn, the loopback, the load generator). CPU shares over the level's wall time: this
load generator's (process CPU time / wall), the service's process tree's and Elasticsearch's (psutil), and
the machine's 1-minute load average at the end of the level; the cores are shared by all three.

Events: ``swap``: 16 clients while a subprocess builds, verifies and swaps in an index of another model
(the base MiniLM) on the same catalog, then rolls the alias back (``serving.publish.build_verify_swap`` /
``serving.alias.rollback``, as ``tests/test_service.py`` does); the requirement is 0 failed requests and answers
from both models. ``restart``: 8 clients while Elasticsearch is stopped and started again
(``elasticsearch_local``; only a server this script's settings own): while it is down every answer must
be a 503 with ``Retry-After``; afterwards the same service process answers 200 again. ``soak``: 16 clients
for ``--soak-s`` seconds, the service tree's RSS sampled every ``--rss-every-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERY_SEED = 7
SWAP_MODEL_VERSION = "load-bench"


# ----- query mixes ----------------------------------------------------------------------------
def query_pools() -> tuple[list[str], list[int], list[str]]:
    """(distinct queries, most frequent first; their counts; catalog titles) of the demo's generator."""
    from near2_tasks.data.synthetic import generate_catalog

    data = generate_catalog(1000, 20000, seed=QUERY_SEED)
    counts = collections.Counter(data.judgments.drop_duplicates("query_id")["query"])
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [q for q, _ in ranked], [c for _, c in ranked], sorted(set(data.products["title"]))


def unique_pool() -> list[str]:
    """Distinct queries and titles of the generator at seeds 7-10 (other seeds: other brands' model
    numbers, other titles): more texts than the levels send, so none repeats."""
    from near2_tasks.data.synthetic import generate_catalog

    texts: set[str] = set()
    for seed in range(QUERY_SEED, QUERY_SEED + 4):
        data = generate_catalog(1000, 20000, seed=seed)
        texts |= set(data.judgments["query"]) | set(data.products["title"])
    return sorted(texts)


class QueryMix:
    """An endless, seeded sequence of query texts."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        self.kind = kind
        rng = np.random.default_rng(seed)
        if kind == "zipf":
            self.pool = distinct = query_pools()[0]
            weights = 1.0 / np.arange(1, len(distinct) + 1)
            self._probabilities = weights / weights.sum()
            self._rng = rng
            self._batch: list[int] = []
        elif kind == "unique":
            self.pool = list(rng.permutation(unique_pool()))
        else:
            raise SystemExit(f"unknown query mix {kind!r}")
        self.cursor = 0
        self.seen: set[str] = set()
        self.repeats = 0

    def next(self) -> str:
        if self.kind == "zipf":
            if not self._batch:
                self._batch = list(self._rng.choice(len(self.pool), size=4096, p=self._probabilities))
            text = self.pool[self._batch.pop()]
        else:
            text = self.pool[self.cursor % len(self.pool)]
            self.cursor += 1
        if text in self.seen:
            self.repeats += 1
        else:
            self.seen.add(text)
        return text


# ----- the service under test -------------------------------------------------------------------
def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class Service:
    """``near2 serve`` in its own process group; CPU and RSS of its process tree through psutil."""

    def __init__(self, port: int, workers: int | None, env: dict[str, str], log_path: Path, code: Path = REPO) -> None:
        self.port, self.workers, self.env, self.log_path, self.code = port, workers, env, log_path, code
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        if _get(self.url + "/health", timeout=1)[0]:
            raise SystemExit(f"something already answers on {self.url}")
        env = {**os.environ, "PYTHONPATH": str(self.code), **self.env}
        command = [sys.executable, "-c", "from near2_tasks.cli import main; main()", "serve", "--port", str(self.port)]
        if self.workers is not None:  # None: serving.workers (and code older than --workers)
            command += ["--workers", str(self.workers)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, env=env, cwd=self.code, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"near2 serve exited with {self.process.returncode}; log: {self.log_path}")
            if _get(self.url + "/health", timeout=2)[0] == 200 and len(self.tree()) >= (self.workers or 1):
                return
            time.sleep(0.5)
        raise SystemExit(f"near2 serve did not become healthy in {timeout_s:.0f} s; log: {self.log_path}")

    def tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except Exception:
                pass
        return total

    def rss_mib(self) -> float:
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss
            except Exception:
                pass
        return total / 2 ** 20

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # our own group: the uvicorn supervisor and its workers
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()


def es_process(settings):
    """The local Elasticsearch's process (psutil), or None."""
    import psutil

    from near2_tasks.serving import elasticsearch_local

    info = elasticsearch_local.status(settings)
    try:
        return psutil.Process(info["pid"]) if info.get("pid") else None
    except psutil.NoSuchProcess:
        return None


def cpu_of(proc) -> float:
    if proc is None:
        return 0.0
    try:
        times = proc.cpu_times()
        return times.user + times.system
    except Exception:
        return 0.0


# ----- the load generator ----------------------------------------------------------------------
def parse_server_timing(value: str | None) -> dict[str, float | str]:
    parsed: dict[str, float | str] = {}
    for entry in (value or "").split(","):
        name, *params = [part.strip() for part in entry.split(";")]
        for param in params:
            key, _, number = param.partition("=")
            if key == "dur":
                parsed[name] = float(number)
            elif key == "desc":
                parsed[name] = number
    return parsed


async def drive(base_url: str, clients: int, next_query, *, duration_s: float, max_requests: int,
                client_kind: str = "aiohttp", need_body: bool = False, stop: asyncio.Event | None = None,
                request_timeout_s: float = 30.0, rate: float = 0.0,
                params: dict[str, str] | None = None) -> tuple[list[tuple], float]:
    """``clients`` concurrent loops of GET /search until ``duration_s``, ``max_requests`` or ``stop``;
    returns (records, wall seconds). A record: (start s since the run began, latency ms, status (0: no
    answer), Retry-After or None, the parsed Server-Timing, the answer's model_version with ``need_body``).

    ``rate`` > 0: each client sends on a fixed schedule (``rate`` / ``clients`` per second, staggered), and
    a latency counts from the request's scheduled time, so a service that falls behind shows its queue
    (no coordinated omission); 0: closed loop, each client sends when its previous answer arrived.
    ``params``: more query parameters of every request (``mode=funnel``, ``dim=64``, ...)."""
    records: list[tuple] = []
    sent = 0
    began = time.perf_counter()
    deadline = began + duration_s

    interval = clients / rate if rate > 0 else 0.0
    extra = dict(params or {})

    async def pace(n: int, i: int) -> float:
        """The scheduled send time of client ``n``'s ``i``-th request (now, in a closed loop)."""
        if not interval:
            return time.perf_counter()
        scheduled = began + (i + n / clients) * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return scheduled

    def more() -> bool:
        nonlocal sent
        if sent >= max_requests or time.perf_counter() >= deadline or (stop is not None and stop.is_set()):
            return False
        sent += 1
        return True

    def keep(t0: float, status: int, headers, body: bytes | None) -> None:
        latency = (time.perf_counter() - t0) * 1000
        version = None
        if need_body and status == 200 and body:
            version = json.loads(body).get("model_version")
        records.append((t0 - began, latency, status, headers.get("retry-after"),
                        parse_server_timing(headers.get("server-timing")), version))

    if client_kind == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=clients, force_close=False)
        timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
            async def loop(n: int) -> None:
                i = 0
                while more():
                    t0 = await pace(n, i)
                    i += 1
                    try:
                        async with session.get("/search", params={"q": next_query(), "k": "10", **extra}) as response:
                            body = await response.read()
                            keep(t0, response.status, response.headers, body)
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        keep(t0, 0, {}, None)

            await asyncio.gather(*(loop(n) for n in range(clients)))
    else:
        import httpx

        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=request_timeout_s) as http:
            async def loop(n: int) -> None:
                i = 0
                while more():
                    t0 = await pace(n, i)
                    i += 1
                    try:
                        response = await http.get("/search", params={"q": next_query(), "k": "10", **extra})
                        keep(t0, response.status_code, response.headers, response.content)
                    except httpx.HTTPError:
                        keep(t0, 0, {}, None)

            await asyncio.gather(*(loop(n) for n in range(clients)))
    return records, time.perf_counter() - began


def summarise(records: list[tuple], wall_s: float) -> dict:
    ok = [r for r in records if r[2] == 200]
    statuses = collections.Counter(str(r[2]) for r in records)
    latencies = np.array([r[1] for r in ok]) if ok else np.array([np.nan])
    summary = {
        "requests": len(records), "errors": len(records) - len(ok), "statuses": dict(statuses),
        "wall_s": round(wall_s, 3), "qps": round(len(ok) / wall_s, 1) if wall_s else None,
        **{f"p{p}_ms": round(float(np.percentile(latencies, p)), 2) for p in (50, 90, 99)},
        "max_ms": round(float(np.max(latencies)), 2),
    }
    parts = collections.defaultdict(list)
    hits = 0
    for _, latency, _, _, timing, _ in ok:
        for name in ("encode", "search", "es", "handler", "app"):
            if name in timing:
                parts[name].append(timing[name])
        if "app" in timing:
            parts["http"].append(latency - timing["app"])
            if "handler" in timing:
                parts["framework"].append(timing["app"] - timing["handler"])
        if timing.get("qcache") == "hit":
            hits += 1
    summary["median_ms"] = {name: round(float(np.median(values)), 3) for name, values in parts.items()}
    summary["query_cache_hit_rate"] = round(hits / len(ok), 4) if ok else None
    return summary


class Meter:
    """CPU of this process, the service tree and Elasticsearch over a span, and the load average."""

    def __init__(self, service: Service, es) -> None:
        self.service, self.es = service, es

    def __enter__(self) -> Meter:
        self.t0, self.own0 = time.perf_counter(), time.process_time()
        self.svc0, self.es0 = self.service.cpu_s(), cpu_of(self.es)
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        self.result = {"loadgen_cpu_share": round((time.process_time() - self.own0) / wall, 3),
                       "service_cpu_share": round((self.service.cpu_s() - self.svc0) / wall, 3),
                       "es_cpu_share": round((cpu_of(self.es) - self.es0) / wall, 3),
                       "load_avg_1m": round(os.getloadavg()[0], 2)}


# ----- scenarios ---------------------------------------------------------------------------------
def run_levels(args, service: Service, es) -> list[dict]:
    """Each mix on a freshly started service (no query vectors cached from the other mix), its levels
    in order on that one service (a cache warms up over the levels, as a storefront's would)."""
    rows = []
    for n, mix_name in enumerate(args.mixes):
        mix = QueryMix(mix_name, seed=args.seed)
        if n:
            service.stop()
            service.start()
        for clients in args.clients:
            asyncio.run(drive(service.url, clients, mix.next, duration_s=args.warmup_s, max_requests=10 ** 9,
                              client_kind=args.client, params=args.params))
            repeats_before, seen_before = mix.repeats, len(mix.seen)
            with Meter(service, es) as meter:
                records, wall = asyncio.run(drive(service.url, clients, mix.next, duration_s=args.level_s,
                                                  max_requests=args.max_requests, client_kind=args.client,
                                                  rate=args.rate, params=args.params))
            row = {"mix": mix_name, "clients": clients, "target_qps": args.rate or None, "params": args.params,
                   **summarise(records, wall),
                   **meter.result,
                   "repeated_texts": mix.repeats - repeats_before, "new_texts": len(mix.seen) - seen_before}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("mix", "clients", "requests", "errors", "qps", "p50_ms", "p99_ms",
                                                 "loadgen_cpu_share", "load_avg_1m", "query_cache_hit_rate")}),
                  flush=True)
    return rows


def swap_step(step: str) -> None:
    """Run in a child process: build, verify and swap in an index of the base model (``build``), or roll back."""
    from near2_tasks.config import load_settings
    from near2_tasks.data.synthetic import generate_catalog
    from near2_tasks.models.settings import PACKAGED_MINILM
    from near2_tasks.serving.alias import rollback
    from near2_tasks.serving.index import prepare_products
    from near2_tasks.serving.publish import build_verify_swap

    settings = load_settings()
    if step == "build":
        demo = settings.demo
        products = generate_catalog(demo.products, demo.queries, seed=settings.dataset.synthetic_seed).products
        built = build_verify_swap(settings, PACKAGED_MINILM, prepare_products(products, settings.dataset.text_template),
                                  model_version=SWAP_MODEL_VERSION, model_name="minilm-base")
        print(json.dumps({"built": built.index.name}), flush=True)
    else:
        moved = rollback(settings)
        from near2_tasks.serving.es_client import make_client

        make_client(settings).indices.delete(index=moved[0])  # the benchmark's index; the demo's is served again
        print(json.dumps({"rolled_back": moved, "deleted": moved[0]}), flush=True)


async def _child(step: str) -> tuple[int, str, float]:
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--swap-step", step, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    out, _ = await process.communicate()
    return process.returncode, out.decode()[-2000:], time.perf_counter() - began


def run_swap(args, service: Service, es) -> dict:
    mix = QueryMix("zipf", seed=args.seed + 1)
    events: list[tuple[str, float]] = []

    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(drive(service.url, args.event_clients, mix.next, duration_s=args.event_max_s,
                                         max_requests=10 ** 9, client_kind=args.client, need_body=True, stop=stop))
        began = time.perf_counter()
        await asyncio.sleep(2)
        outcome = {}
        for step in ("build", "rollback"):
            events.append((f"{step} started", time.perf_counter() - began))
            code, out, took = await _child(step)
            events.append((f"{step} done", time.perf_counter() - began))
            outcome[step] = {"exit": code, "s": round(took, 1), "out": out.strip().splitlines()[-1:] if out else []}
            if code != 0:
                break
            await asyncio.sleep(3)
        stop.set()
        records, wall = await load
        return records, wall, outcome

    with Meter(service, es) as meter:
        records, wall, outcome = asyncio.run(scenario())
    versions = collections.Counter(r[5] for r in records if r[2] == 200)
    return {"clients": args.event_clients, **summarise(records, wall), **meter.result, "steps": outcome,
            "events_s": [(name, round(t, 2)) for name, t in events],
            "answers_by_model_version": {str(k): v for k, v in versions.items()}}


def run_restart(args, service: Service, es_settings) -> dict:
    from near2_tasks.serving import elasticsearch_local

    mix = QueryMix("zipf", seed=args.seed + 2)
    marks: dict[str, float] = {}

    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(drive(service.url, args.restart_clients, mix.next, duration_s=args.event_max_s,
                                         max_requests=10 ** 9, client_kind=args.client, stop=stop,
                                         request_timeout_s=60))
        began = time.perf_counter()
        await asyncio.sleep(3)
        marks["stop_called"] = time.perf_counter() - began
        await asyncio.to_thread(elasticsearch_local.stop, es_settings)
        marks["stopped"] = time.perf_counter() - began
        await asyncio.sleep(args.down_s)
        health_down = await asyncio.to_thread(_get, service.url + "/health")
        marks["start_called"] = time.perf_counter() - began
        await asyncio.to_thread(elasticsearch_local.start, es_settings)
        marks["healthy"] = time.perf_counter() - began
        await asyncio.sleep(5)
        stop.set()
        records, wall = await load
        return records, wall, health_down

    records, wall, health_down = asyncio.run(scenario())
    down = [r for r in records if marks["stopped"] <= r[0] < marks["start_called"]]
    after = [r for r in records if r[0] >= marks["healthy"]]
    first_ok_after = min((r[0] + r[1] / 1000 for r in records if r[2] == 200 and r[0] >= marks["stopped"]),
                         default=None)
    failures = [r for r in records if r[2] not in (200, 503)]
    return {
        "clients": args.restart_clients, "marks_s": {k: round(v, 2) for k, v in marks.items()},
        "statuses": dict(collections.Counter(str(r[2]) for r in records)),
        "while_down": {"requests": len(down), "statuses": dict(collections.Counter(str(r[2]) for r in down)),
                       "503_with_retry_after": sum(1 for r in down if r[2] == 503 and r[3] is not None),
                       "503_without_retry_after": sum(1 for r in down if r[2] == 503 and r[3] is None),
                       "p99_ms": round(float(np.percentile([r[1] for r in down], 99)), 1) if down else None},
        "health_while_down": health_down[0],
        "not_200_or_503": len(failures),
        "after_healthy": {"requests": len(after), "statuses": dict(collections.Counter(str(r[2]) for r in after))},
        "first_200_after_stop_s": round(first_ok_after, 2) if first_ok_after is not None else None,
        "service_pid_unchanged": service.process.poll() is None,
    }


def run_soak(args, service: Service, es) -> dict:
    mix = QueryMix("zipf", seed=args.seed + 3)
    rss: list[tuple[float, float]] = []

    async def sampler(stop: asyncio.Event, began: float):
        while not stop.is_set():
            rss.append((round(time.perf_counter() - began, 1), round(service.rss_mib(), 1)))
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.rss_every_s)
            except asyncio.TimeoutError:
                pass

    async def scenario():
        stop = asyncio.Event()
        began = time.perf_counter()
        sampling = asyncio.create_task(sampler(stop, began))
        records, wall = await drive(service.url, args.event_clients, mix.next, duration_s=args.soak_s,
                                    max_requests=args.soak_max_requests, client_kind=args.client)
        stop.set()
        await sampling
        rss.append((round(time.perf_counter() - began, 1), round(service.rss_mib(), 1)))
        return records, wall

    with Meter(service, es) as meter:
        records, wall = asyncio.run(scenario())
    minutes = []
    for m in range(int(np.ceil(wall / 60))):
        chunk = [r for r in records if m * 60 <= r[0] < (m + 1) * 60]
        if chunk:
            row = summarise(chunk, min(60.0, wall - m * 60))
            minutes.append({"minute": m + 1, **{k: row[k] for k in ("requests", "errors", "qps", "p50_ms", "p99_ms")}})
    values = [v for _, v in rss]
    tail = [v for t, v in rss if t >= wall / 2]  # after the first half: a leak keeps growing, a cache settles
    return {"clients": args.event_clients, "soak_s": args.soak_s, **summarise(records, wall), **meter.result,
            "per_minute": minutes, "rss_mib": rss,
            "rss_summary": {"first": values[0], "last": values[-1], "max": max(values),
                            "second_half_growth_mib": round(tail[-1] - tail[0], 1) if tail else None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", default=["levels"], help="levels, swap, restart, soak")
    parser.add_argument("--swap-step", choices=["build", "rollback"], help=argparse.SUPPRESS)
    parser.add_argument("--label", default="default", help="name of the service configuration")
    parser.add_argument("--port", type=int, default=8256)
    parser.add_argument("--workers", type=int, default=None, help="near2 serve --workers (default: serving.workers)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service (NEAR2_SERVING__...)")
    parser.add_argument("--service-code", type=Path, default=REPO,
                        help="where the served near2_tasks comes from (e.g. an older commit's export, for a before/after)")
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp")
    parser.add_argument("--clients", default="1,8,16,32")
    parser.add_argument("--param", action="append", default=[],
                        help="KEY=VALUE added to every GET /search of the levels (mode=funnel, dim=64, ...)")
    parser.add_argument("--mixes", default="zipf,unique")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="levels: total requests/s on a fixed schedule (0: closed loop, as fast as answered)")
    parser.add_argument("--level-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=10000, help="per level")
    parser.add_argument("--event-clients", type=int, default=16)
    parser.add_argument("--restart-clients", type=int, default=8)
    parser.add_argument("--event-max-s", type=float, default=240.0, help="upper bound of a swap/restart run")
    parser.add_argument("--down-s", type=float, default=5.0, help="how long Elasticsearch stays down")
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--soak-max-requests", type=int, default=500000)
    parser.add_argument("--rss-every-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.swap_step:
        swap_step(args.swap_step)
        return
    args.clients = [int(c) for c in args.clients.split(",")]
    args.mixes = args.mixes.split(",")
    args.params = dict(item.split("=", 1) for item in args.param)
    extra_env = dict(item.split("=", 1) for item in args.env)

    from near2_tasks.serving import elasticsearch_local
    from near2_tasks.config import load_settings

    settings = load_settings()
    url = settings.elasticsearch.url
    if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit(f"loopback only: NEAR2_ELASTICSEARCH__URL is {url}")
    es = es_process(settings)
    service = Service(args.port, args.workers, extra_env,
                      settings.home / "bench" / f"load-serve-{args.label}.log", code=args.service_code)
    import psutil

    result = {"label": args.label, "rate": args.rate,
              "workers": args.workers or f"serving.workers ({settings.serving.workers} here)",
              "service_code": str(args.service_code), "env": extra_env, "client": args.client,
              "es_version": elasticsearch_local.server_version(url), "es_url": url,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1)},
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "bounds": {"level_s": args.level_s, "max_requests": args.max_requests, "warmup_s": args.warmup_s}}
    service.start()
    try:
        health = json.loads(_get(service.url + "/health")[1])
        result["served"] = {k: health.get(k) for k in ("index", "model_name", "model_version", "dims")}
        for scenario in args.scenarios:
            print(f"== {scenario} ({args.label})", flush=True)
            if scenario == "levels":
                result["levels"] = run_levels(args, service, es)
            elif scenario == "swap":
                result["swap"] = run_swap(args, service, es)
                print(json.dumps({k: result["swap"][k] for k in ("requests", "errors", "answers_by_model_version")}))
            elif scenario == "restart":
                result["restart"] = run_restart(args, service, settings)
                es = es_process(settings)
                print(json.dumps(result["restart"]))
            elif scenario == "soak":
                result["soak"] = run_soak(args, service, es)
                print(json.dumps({k: result["soak"][k]
                                  for k in ("requests", "errors", "qps", "p99_ms", "rss_summary")}))
            else:
                raise SystemExit(f"unknown scenario {scenario!r}")
    finally:
        result["service_rss_mib_end"] = round(service.rss_mib(), 1)
        service.stop()
        result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
