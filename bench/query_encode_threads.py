"""How many torch threads should encode one storefront query? Default pool vs one thread, side by side.

    .venv/bin/python bench/query_encode_threads.py [--queries 100] [--data-dir ../shared/data/homedepot]

Each query is encoded twice in a row (alternating which setting goes first), with torch's default thread
count and with one thread (``serving.encode_threads``); medians and p99 of each, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from near2_tasks.models.settings import PACKAGED_MINILM  # noqa: E402
from near2_tasks.models.embeddings import encode, load_encoder  # noqa: E402
from near2_tasks.serving.query_encoder import torch_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--model", default=PACKAGED_MINILM)
    args = parser.parse_args()
    import torch

    queries = pd.read_csv(args.data_dir / "judgments.csv")["query"].drop_duplicates()
    queries = queries.sample(min(args.queries, len(queries)), random_state=0).tolist()
    model = load_encoder(args.model, device="cpu")
    default_threads = torch.get_num_threads()
    encode(model, queries[:5])  # warm-up
    seconds: dict[str, list[float]] = {"default": [], "one": []}
    for i, query in enumerate(queries):
        order = [("default", None), ("one", 1)] if i % 2 == 0 else [("one", 1), ("default", None)]
        for name, threads in order:
            with torch_threads(threads):
                began = time.perf_counter()
                encode(model, [query], batch_size=1)
                seconds[name].append(time.perf_counter() - began)
    ms = {name: np.asarray(values) * 1000 for name, values in seconds.items()}
    print(f"{len(queries)} queries, {os.cpu_count()} cores, torch default threads {default_threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| torch threads | p50 ms | p99 ms |\n|---|---:|---:|")
    for name, label in (("default", f"default ({default_threads})"), ("one", "1")):
        print(f"| {label} | {np.median(ms[name]):.1f} | {np.percentile(ms[name], 99):.1f} |")
    print(f"median ratio default / one thread: {np.median(ms['default']) / np.median(ms['one']):.1f}x")


if __name__ == "__main__":
    main()
