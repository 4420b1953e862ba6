"""Screenshots for the README (docs/img/), taken in headless Chromium against the state `make demo` left.

    make demo                                # once: a near2_retrain run, a champion, an index behind the alias
    .venv/bin/python docs/screenshots.py     # [--home .near2] [--out docs/img] [--query "cordless drill"]

It starts, each on a free local port and only for the screenshots: the storefront service (`near2 serve`'s app),
an MLflow server on the demo's SQLite store, and an Airflow API server on the demo's Airflow home (no scheduler:
nothing runs; `simple_auth_manager_all_admins`, so no login). Writes:

* storefront.png, storefront_side_by_side.png: the page at `/` with a query, and the same query at every dim;
* airflow_grid.png: the grid of the latest near2_retrain run; airflow_task_links.png: its train task's Details
  tab, which carries the MLflow run / model version links (Airflow 3.3 shows extra links there);
* mlflow_model_version.png: the champion's model-version page (gate table, slice table, plot link, tags).

Needs chromium + chromium-driver (see `make browser`) and a running Elasticsearch with the demo's index
(`make es-start`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser_support import free_port, headless_chromium, live_server  # noqa: E402

DAG_ID = "near2_retrain"
SETTLE_S = 4  # the Airflow and MLflow UIs keep fetching for a moment after their first paint


def log(message: str) -> None:
    print(f"[screenshots] {message}", flush=True)


def wait_for_http(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {timeout_s:.0f}s: {exc}")
            time.sleep(1)


@contextmanager
def background(command: list[str], env: dict[str, str], log_path: Path):
    """A child in its own process group (Airflow's api-server starts workers), stopped with its group."""
    with open(log_path, "w") as output:
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield child
    finally:
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(child.pid, signal.SIGKILL)


def screenshot(driver, path: Path, ready_js: str, what: str, timeout_s: float = 60, settle_s: float = 0) -> None:
    """Wait until ``ready_js`` is true, grow the window to the page's height, save a PNG."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(lambda d: d.execute_script(ready_js), f"{what} never became ready")
    time.sleep(settle_s)
    height = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, max(800, min(int(height) + 120, 2400)))
    time.sleep(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(width, 1000)
    log(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def text_visible(text: str) -> str:
    return f"return document.body && document.body.innerText.includes({json.dumps(text)})"


def latest_run_id(home: Path) -> str:
    results = sorted((home / "demo" / "logs").glob("*.result.json"))
    for path in reversed(results):
        outcome = json.loads(path.read_text())
        if outcome.get("state") == "success":
            return outcome["run_id"]
    raise SystemExit(f"no successful demo run under {home / 'demo' / 'logs'}: run `make demo` first")


def storefront(driver, settings, out: Path, query: str) -> None:
    from near2_tasks.serving.service import create_app

    with live_server(create_app(settings)) as url:
        driver.get(f"{url}/?q={quote(query)}&dim=64")
        screenshot(driver, out / "storefront.png", "return document.getElementById('results-section').hidden === false",
                   "the storefront's results")
        driver.get(f"{url}/?q={quote(query)}&compare=1&k=5")
        screenshot(driver, out / "storefront_side_by_side.png",
                   "return document.getElementById('compare-section').dataset.complete === 'true'",
                   "the side-by-side view")


def mlflow_version_page(driver, settings, out: Path, home: Path) -> None:
    from near2_tasks.promote.gates import current_champion

    champion = current_champion(settings)
    if champion is None:
        raise SystemExit("the demo's registry has no champion: run `make demo` first")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", settings.tracking_uri,
               "--default-artifact-root", settings.artifact_location, "--workers", "1", "--host", "127.0.0.1",
               "--port", str(port)]
    with background(command, env, home / "screenshots-mlflow.log"):
        wait_for_http(f"http://127.0.0.1:{port}/health")
        name = settings.mlflow.registered_model
        driver.get(f"http://127.0.0.1:{port}/#/models/{name}/versions/{champion.version}")
        screenshot(driver, out / "mlflow_model_version.png", text_visible("Gate PASSED"), "the MLflow version page",
                   settle_s=SETTLE_S)


def airflow_pages(driver, home: Path, out: Path) -> None:
    run_id = latest_run_id(home)
    env_file = home / "airflow" / "env.sh"
    if not env_file.is_file():
        raise SystemExit(f"{env_file} not found: run `make demo` first")
    env = dict(os.environ)
    for line in env_file.read_text().splitlines():  # export KEY="VALUE"
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip('"').replace("$PATH", os.environ.get("PATH", ""))
    port = free_port()
    env.update({"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True", "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}"})
    airflow = str(Path(sys.executable).parent / "airflow")
    with background([airflow, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env,
                    home / "screenshots-airflow.log"):
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/api/v2/monitor/health", timeout_s=180)
        run_path = f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
        driver.get(f"{base}/auth/token/login?next={quote(run_path, safe='')}")  # sets the _token cookie
        screenshot(driver, out / "airflow_grid.png", text_visible("smoke_search"), "the Airflow grid",
                   settle_s=SETTLE_S)
        # Airflow 3.3 shows a task's extra links on its Details tab (not on the Logs tab it opens with)
        driver.get(f"{base}{run_path}/tasks/train/details")
        screenshot(driver, out / "airflow_task_links.png", text_visible("MLflow model version"),
                   "the train task's extra links", settle_s=SETTLE_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("NEAR2_HOME", REPO / ".near2")))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--query", default="cordless drill")
    args = parser.parse_args(argv)
    home = args.home.resolve()
    config = home / "demo" / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"{config} not found: run `make demo` first (or pass --home)")

    from near2_tasks.config import load_settings

    settings = load_settings(config)
    with headless_chromium(width=1400, height=1000) as driver:
        storefront(driver, settings, args.out, args.query)
        mlflow_version_page(driver, settings, args.out, home)
        airflow_pages(driver, home, args.out)


if __name__ == "__main__":
    main()
