"""Browser check of a finished project (`make ui-check`): start the Dagster webserver and the MLflow UI on
loopback, open the asset graph, two evaluation assets (their `report` markdown opened: a plot must
render in it), runtime_eval's checks, the newest `mcx_pipeline` run and the newest MLflow run in
headless Chromium (driven by playwright when installed, else `chromium --screenshot/--dump-dom`), assert
key elements of each rendered page, and save screenshots.

Read-only: the Dagster instance (`.dagster_home`) and the MLflow store (`mlruns/mlflow.db`) are copied to
a temporary folder first, and only the webserver runs (no daemon: no schedule, sensor or automation
starts anything).

    python bench/ui_check.py [--root .] [--out artifacts/ui-check] [--config configs/default.yaml]

Exit 0 when every page shows its elements, 1 otherwise (each miss printed), 2 when the project has no
Dagster instance or MLflow store to show.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def graphql(base: str, query: str) -> dict:
    req = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["data"]


LOCATIONS = ("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
             "locationOrLoadError { __typename ... on PythonError { message } } } } } }")


def wait_code_location(base: str, timeout_s: float) -> None:
    """Until every code location has loaded (the webserver answers before its code server is up);
    RuntimeError naming the load error of a location that failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = graphql(base, LOCATIONS)["workspaceOrError"].get("locationEntries") or []
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            for e in entries:
                if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError":
                    raise RuntimeError(f"code location {e['name']} failed to load: "
                                       f"{e['locationOrLoadError']['message'].strip()[:500]}")
            return
        time.sleep(2)
    raise RuntimeError(f"the code locations did not load within {timeout_s:.0f} s")


def chromium() -> str:
    for name in CHROMIUM:
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no chromium on PATH (apt-get install -y chromium)")


def render_cli(url: str, png: Path, budget_ms: int = 20000) -> str:
    """Without playwright: `chromium --headless --screenshot` and `--dump-dom` (no clicks, so Dagster's
    first-visit dialog stays on the screenshot). Returns the DOM after `budget_ms` of virtual time."""
    common = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--window-size=1600,1000", f"--virtual-time-budget={budget_ms}", "--run-all-compositor-stages-before-draw"]
    subprocess.run([*common, f"--screenshot={png}", url], capture_output=True, timeout=180, check=False)
    done = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=False)
    return done.stdout


SHOWN_IMAGES = "Array.from(document.querySelectorAll('img')).filter(i => i.naturalWidth > 0).length"


def render_playwright(page, url: str, png: Path, expect: list[str], markdown: str | None) -> tuple[str, list[str]]:
    """Open `url`, dismiss Dagster's first-visit dialog, wait for each `expect` text; with `markdown`
    (a metadata key), open that entry's [Show Markdown] and require a rendered image in it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    def dismiss_dialogs() -> None:  # Dagster's "Join the Dagster community" dialog, shown on first visits
        skip = page.get_by_role("button", name="Skip")
        try:
            skip.first.wait_for(timeout=3000)
            skip.first.click()
        except PlaywrightTimeout:
            pass

    misses = []
    page.goto(url, wait_until="load", timeout=180_000)
    try:  # Dagster settles; MLflow's pages keep polling, so networkidle may never come
        page.wait_for_load_state("networkidle", timeout=20_000)
    except PlaywrightTimeout:
        pass
    dismiss_dialogs()
    search = page.get_by_placeholder("Filter metadata keys")  # the metadata table renders only rows in view
    for text in expect:
        try:
            page.get_by_text(text).first.wait_for(timeout=30_000)
            continue
        except PlaywrightTimeout:
            pass
        try:  # a metadata key further down: filter the table to it
            if not search.count():
                raise PlaywrightTimeout("no metadata table")
            search.first.fill(text)
            page.get_by_text(text, exact=True).first.wait_for(timeout=10_000)
            search.first.fill("")
        except PlaywrightTimeout:
            misses.append(f"{text!r} not on the page")
    if markdown:
        if search.count():
            search.first.fill(markdown)
            page.wait_for_timeout(1000)
        row = page.locator("tr", has=page.get_by_text(markdown, exact=True)).get_by_text("[Show Markdown]")
        if not row.count():
            misses.append(f"metadata {markdown!r}: no [Show Markdown]")
        else:
            dismiss_dialogs()
            before = page.evaluate(SHOWN_IMAGES)
            try:
                row.first.click(timeout=30_000)
                page.wait_for_timeout(2000)
                if page.evaluate(SHOWN_IMAGES) <= before:
                    misses.append(f"metadata {markdown!r}: the markdown shows no image")
            except PlaywrightTimeout:
                misses.append(f"metadata {markdown!r}: [Show Markdown] could not be opened")
    page.screenshot(path=str(png))
    content = page.content()
    page.keyboard.press("Escape")  # close the markdown dialog before the next page
    return content, misses


def newest_mlflow_run(db: Path) -> tuple[str, str] | None:
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT experiment_id, run_uuid FROM runs WHERE lifecycle_stage = 'active' "
                          "ORDER BY start_time DESC LIMIT 1").fetchone()
    return (str(row[0]), row[1]) if row else None


def check(root: Path, out: Path, config: str, startup_s: float = 240) -> list[str]:
    """Every page's missing elements (empty: all shown). Screenshots go to `out`."""
    home, db = root / ".dagster_home", root / "mlruns" / "mlflow.db"
    if not (home / "dagster.yaml").is_file() or not db.is_file():
        raise FileNotFoundError(f"{root}: needs .dagster_home/dagster.yaml and mlruns/mlflow.db (run make demo)")
    out.mkdir(parents=True, exist_ok=True)
    misses: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mcx-ui-check-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(home, tmp / "dagster_home", ignore=shutil.ignore_patterns("*.lock", "logs"))
        (tmp / "mlruns").mkdir()
        shutil.copy2(db, tmp / "mlruns" / "mlflow.db")
        env = {**os.environ, "DAGSTER_HOME": str(tmp / "dagster_home"), "MCX_HOME": str(root), "MCX_CONFIG": config}
        bin_dir = Path(sys.executable).parent
        d_port, m_port = free_port(), free_port()
        procs = [
            subprocess.Popen([str(bin_dir / "dagster-webserver"), "-w", str(root / "workspace.yaml"), "-h", "127.0.0.1",
                              "-p", str(d_port)], cwd=root, env=env, stdout=subprocess.DEVNULL,
                             stderr=open(tmp / "dagster.log", "w")),  # noqa: SIM115
            subprocess.Popen([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
                              "--host", "127.0.0.1", "--port", str(m_port), "--workers", "1"], cwd=tmp, env=env,
                             stdout=subprocess.DEVNULL, stderr=open(tmp / "mlflow.log", "w")),  # noqa: SIM115
        ]
        try:
            dagster, mlflow = f"http://127.0.0.1:{d_port}", f"http://127.0.0.1:{m_port}"
            wait_http(f"{dagster}/server_info", startup_s, procs[0])
            wait_http(f"{mlflow}/health", startup_s, procs[1])
            wait_code_location(dagster, startup_s)
            runs = graphql(dagster, "{ runsOrError(limit: 20) { ... on Runs { results { runId jobName status } } } }")
            results = runs["runsOrError"]["results"]
            run = next((r for r in results if r["jobName"] == "mcx_pipeline"), results[0] if results else None)
            pages = [
                ("asset_graph", f"{dagster}/asset-groups", ["Global asset lineage", "evaluation", "telemetry"], None),
                ("asset_baseline_eval", f"{dagster}/assets/baseline_eval", ["baseline_eval", "reused"], "report"),
                ("asset_gist_eval_report", f"{dagster}/assets/gist_eval_report", ["gist_eval_report"], "report"),
                ("check_telemetry_schema_valid", f"{dagster}/assets/runtime_eval?view=checks",
                 ["telemetry_schema_valid", "runtime_swap_rate"], None),
            ]
            if run:
                pages.append(("run", f"{dagster}/runs/{run['runId']}", [run["runId"][:8], run["jobName"]], None))
            else:
                misses.append("dagster: no run in the instance")
            newest = newest_mlflow_run(tmp / "mlruns" / "mlflow.db")
            if newest:
                pages.append(("mlflow_run", f"{mlflow}/#/experiments/{newest[0]}/runs/{newest[1]}",
                              ["Run ID", "dagster.run_id"], None))
            else:
                misses.append("mlflow: no run in the store")
            try:
                from playwright.sync_api import sync_playwright
            except ImportError:
                sync_playwright = None
            if sync_playwright is None:
                for name, url, expect, _ in pages:
                    dom = render_cli(url, out / f"{name}.png")
                    (out / f"{name}.html").write_text(dom, encoding="utf-8")
                    misses += [f"{name} ({url}): {t!r} not on the page" for t in expect if t not in dom]
            else:
                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
                    page = browser.new_page(viewport={"width": 1600, "height": 1000})
                    for name, url, expect, markdown in pages:
                        dom, missed = render_playwright(page, url, out / f"{name}.png", expect, markdown)
                        (out / f"{name}.html").write_text(dom, encoding="utf-8")
                        misses += [f"{name} ({url}): {m}" for m in missed]
                    browser.close()
            misses += [f"{name}: no screenshot" for name, *_ in pages if not (out / f"{name}.png").is_file()]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return misses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="project root (holds .dagster_home, mlruns, workspace.yaml)")
    ap.add_argument("--out", default=None, help="screenshot folder (default: <root>/artifacts/ui-check)")
    ap.add_argument("--config", default="configs/default.yaml")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    out = Path(args.out) if args.out else root / "artifacts" / "ui-check"
    try:
        misses = check(root, out, args.config)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a server that did not come up, a code location that did not load
        print(f"MISSING {err}")
        return 1
    for m in misses:
        print(f"MISSING {m}")
    print(f"{'ui-check passed' if not misses else f'{len(misses)} missing'}; screenshots in {out}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
