"""DuckDB over the artifacts: views with absolute paths, bound parameters, clean errors."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from mcx_core.tools.query import connect, run_query, views


def _artifacts(root):
    (root / "deltas").mkdir(parents=True)
    pq.write_table(
        pa.table({"block_id": [1, 2, 2], "level": [1, 1, 2], "action": ["expand", "collapse", "expand"],
                  "delta_nll": [-0.2, 0.1, -0.05]}),
        root / "deltas" / "JT1_cycle0_labels.parquet",
    )
    (root / "traces").mkdir()
    lines = [{"step": i, "expanded": [i], "collapsed": [], "latency_ms": 10.0 + i} for i in range(4)]
    (root / "traces" / "run.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (root / "eval").mkdir()
    pq.write_table(pa.table({"dataset": ["code"], "nll": [1.5]}), root / "eval" / "baseline_eval.parquet")
    return root


def test_views_and_parameters(tmp_path, monkeypatch):
    root = _artifacts(tmp_path / "artifacts")
    monkeypatch.chdir(tmp_path / "artifacts" / "deltas")  # views must not depend on the working directory
    con = connect(root)
    assert {"deltas", "traces", "baseline_eval"} <= set(views(con))
    cols, rows = run_query(con, "SELECT level, count(*) n FROM deltas WHERE action = ? GROUP BY 1 ORDER BY 1", ["expand"])
    assert cols == ["level", "n"] and rows == [(1, 1), (2, 1)]
    _, rows = run_query(con, "SELECT max(latency_ms) FROM traces")
    assert rows == [(13.0,)]
    # Two queries in a row on one connection (DuckDB 2 streams results; fetchall keeps this safe).
    assert run_query(con, "SELECT 1")[1] == [(1,)] and run_query(con, "SELECT 2")[1] == [(2,)]


def test_empty_artifacts_have_no_views(tmp_path):
    assert views(connect(tmp_path)) == []


def test_cli_query_json_and_bad_sql(tmp_path):
    root = _artifacts(tmp_path / "artifacts")
    ok = subprocess.run(
        [sys.executable, "-m", "mcx_cli", "query", "SELECT count(*) AS n FROM deltas WHERE delta_nll < ?",
         "--param", "0", "--json", "--artifacts", str(root)],
        capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == [{"n": 2}]
    bad = subprocess.run(
        [sys.executable, "-m", "mcx_cli", "query", "SELEKT nonsense", "--artifacts", str(root)],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: Parser Error") and "Traceback" not in bad.stderr
