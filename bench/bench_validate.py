"""How long the data stage takes on a real catalog: load, validate (GX), mine examples.

    .venv/bin/python bench/bench_validate.py [--data ../shared/data/homedepot] [--repeats 3]

Each stage runs ``--repeats`` times in one process (GX imported once, as in an Airflow worker);
the table gives the median and the spread. Reads the data in place; writes only under a temporary
directory. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    began = time.perf_counter()
    import great_expectations  # noqa: F401 - measured separately: paid once per process

    from near2_tasks.config import load_settings
    from near2_tasks.data.adapters import load_dataset
    from near2_tasks.train.examples import mine_examples, split_by_query
    from near2_tasks.data.validate import validate_dataset

    import_s = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(home=tmp, validation={"max_row_count_drift": None})
        no_docs = load_settings(home=tmp, validation={"max_row_count_drift": None, "data_docs": False})
        rows: list[tuple[str, list[float]]] = [("import near2 + great_expectations", [import_s])]
        rows.append(("load (read + canonical columns)", timed(lambda: load_dataset(settings, args.data), args.repeats)[0]))
        times, result = timed(lambda: validate_dataset(settings, args.data, report_dir=Path(tmp) / "r"), args.repeats)
        rows.append(("validate_dataset (with HTML data docs)", times))
        rows.append(("validate_dataset (no data docs)",
                     timed(lambda: validate_dataset(no_docs, args.data, report_dir=Path(tmp) / "r2"), args.repeats)[0]))
        ex = settings.examples
        split_times, splits = timed(lambda: split_by_query(result.judgments, ex.seed, ex.split_fractions), args.repeats)
        rows.append(("split_by_query", split_times))
        rows.append(("mine_examples (no model)",
                     timed(lambda: mine_examples(result.products, splits.train, settings), args.repeats)[0]))

    tables = result.report["tables"]
    print(f"data: {args.data} — catalog {tables['catalog']['input_rows']} rows "
          f"({tables['catalog']['quarantined_rows']} quarantined), judgments {tables['judgments']['input_rows']} rows "
          f"({tables['judgments']['quarantined_rows']} quarantined); repeats {args.repeats}\n")
    print("| stage | median s | min s | max s |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in rows:
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
