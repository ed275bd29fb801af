"""Input hardening (issue 14): the sandboxed query CLI, config validation, strict JSON, one-line errors,
streaming text readers, MLflow filter escaping. Real DuckDB/Parquet, real Dagster and MLflow stores."""

import errno
import json
import math
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from helpers import shakespeare_play

from mcx_cli._common import condensed_dagster_logs, describe_error
from mcx_cli.main import McxGroup, main
from mcx_core.config import ConfigError, check_files, load_config, parse_config
from mcx_core.jsonutil import dumps_strict, loads_strict, to_jsonable
from mcx_core.textstream import TextError, stream_token_ids, stream_token_prefix
from mcx_core.tools.query import QueryError, connect, glob_literal, run_query, views

REPO = Path(__file__).resolve().parents[1]


def _mcx(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mcx_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, check=False)


def _one_line_error(res, code=2):
    out = (res.stderr if hasattr(res, "stderr") else res.output).strip()
    assert res.returncode == code if hasattr(res, "returncode") else res.exit_code == code, out
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


# ---------------------------------------------------------------------------------------------- query


def _trace(path: Path, steps: list[int]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "latency_ms": 1.0}) + "\n" for s in steps))


def test_glob_characters_in_the_artifacts_path_read_only_its_own_files(tmp_path):
    _trace(tmp_path / "x*y" / "traces" / "t.jsonl", [1])
    _trace(tmp_path / "xay" / "traces" / "t.jsonl", [2, 3])  # a sibling the glob `x*y` would match
    (tmp_path / "a[1]" / "eval").mkdir(parents=True)
    pq.write_table(pa.table({"v": [7]}), tmp_path / "a[1]" / "eval" / "e.parquet")
    assert glob_literal("/r/x*y/a[1]?") == "/r/x[*]y/a[[]1][?]"
    assert run_query(connect(tmp_path / "x*y"), "SELECT count(*) FROM traces")[1] == [(1,)]
    assert run_query(connect(tmp_path / "a[1]"), "SELECT v FROM e")[1] == [(7,)]


def test_a_corrupt_file_is_skipped_with_a_warning_and_the_rest_still_query(tmp_path):
    root = tmp_path / "artifacts"
    _trace(root / "traces" / "good.jsonl", [1, 2])
    (root / "traces" / "bad.jsonl").write_text('{"step": 1}\n{"step": 2, "trunc')
    (root / "eval").mkdir()
    pq.write_table(pa.table({"v": [1.5]}), root / "eval" / "ok.parquet")
    (root / "eval" / "broken.parquet").write_bytes((root / "eval" / "ok.parquet").read_bytes()[:40])
    (root / "deltas").mkdir()
    (root / "deltas" / "d.parquet").write_bytes(b"PAR1 not really")
    warnings = []
    con = connect(root, on_skip=warnings.append)
    assert run_query(con, "SELECT 1")[1] == [(1,)]
    assert run_query(con, "SELECT step FROM traces ORDER BY 1")[1] == [(1,), (2,)]
    assert run_query(con, "SELECT v FROM ok")[1] == [(1.5,)]
    assert {"traces", "ok"} <= set(views(con)) and "broken" not in views(con) and "deltas" not in views(con)
    assert len(warnings) == 3 and all(w.startswith("skipped ") for w in warnings)
    res = _mcx("query", "SELECT count(*) AS n FROM traces", "--json", "--artifacts", root)
    assert res.returncode == 0 and json.loads(res.stdout) == [{"n": 2}]
    assert res.stderr.count("warning: skipped") == 3 and "Traceback" not in res.stderr


@pytest.mark.parametrize("sql, says", [
    ("SELECT * FROM read_csv('/etc/passwd')", "disabled by configuration"),
    ("SELECT * FROM read_text('{root}/../outside.txt')", "disabled by configuration"),
    ("COPY (SELECT 1) TO '/tmp/mcx_copy_test.csv'", "not COPY"),
    ("COPY (SELECT 1) TO '{root}/inside.csv'", "not COPY"),
    ("INSTALL httpfs", "only read queries"),
    ("ATTACH '{root}/x.duckdb'", "not ATTACH"),
    ("SET enable_external_access = true", "not SET"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("", "empty query"),
    ("  ;  ", "empty query"),
])
def test_the_query_sandbox_refuses_with_one_line(tmp_path, sql, says):
    root = tmp_path / "artifacts"
    _trace(root / "traces" / "t.jsonl", [1])
    (tmp_path / "outside.txt").write_text("secret\n")
    res = _mcx("query", sql.format(root=root), "--artifacts", root)
    assert says in _one_line_error(res)
    assert not (root / "inside.csv").exists() and not (root / "x.duckdb").exists()
    assert not Path("/tmp/mcx_copy_test.csv").exists()


def test_the_library_connection_is_locked_too(tmp_path):
    import duckdb

    con = connect(tmp_path)
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        con.execute("SELECT * FROM read_csv('/etc/passwd')").fetchall()
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(QueryError):
        run_query(con, "COPY (SELECT 1) TO '/tmp/x.csv'")


def test_query_json_is_strict(tmp_path):
    res = _mcx("query", "SELECT 'NaN'::DOUBLE AS a, 'inf'::DOUBLE AS b, 1.5 AS c", "--json", "--artifacts", tmp_path)
    assert res.returncode == 0, res.stderr
    assert loads_strict(res.stdout) == [{"a": None, "b": None, "c": 1.5}]


# ---------------------------------------------------------------------------------------------- config


def _smoke() -> dict:
    return yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "c.yaml", REPO)
    return err.value.problems


def _set(data: dict, dotted: str, value):
    node = data
    *parts, last = dotted.split(".")
    for p in parts:
        node = node.setdefault(p, {})
    node[last] = value
    return data


@pytest.mark.parametrize("field, value, names", [
    ("lensnet.model.hidden_size", 129, "lensnet.model"),
    ("gistnet.model.hidden_size", 102, "gistnet.model"),
    ("gistnet.model.num_heads", 3, "gistnet.model.num_heads"),  # 'auto' = the tiny model's 64
    ("base_model.tiny.num_heads", 5, "base_model.tiny"),
    ("dataset.context_tokens", 2**70, "dataset.context_tokens"),
    ("working_context.w_max", 2**40, "working_context.w_max"),
    ("runtime.steps", 2**63, "runtime.steps"),
    ("dataset.horizon", True, "dataset.horizon"),
    ("runtime.steps", 2.5, "runtime.steps"),
    ("runtime.steps", "10", "runtime.steps"),
    ("base_model.tiny.hidden_size", 64.0, "base_model.tiny.hidden_size"),
    ("mlflow.system_metrics", 1, "mlflow.system_metrics"),
    ("acceptance.delta_nll_max", float("nan"), "acceptance.delta_nll_max"),
    ("alerts.latency_ratio_max", float("inf"), "alerts.latency_ratio_max"),
    ("mlflow.tracking_uri", "bogus-uri", "mlflow.tracking_uri"),
    ("mlflow.tracking_uri", "sqlite:/rel.db", "mlflow.tracking_uri"),
    ("alerts.command", [], "alerts.command"),
    ("runtime.documents", 99, "runtime.documents"),
])
def test_bad_values_are_one_problem_naming_the_field(field, value, names):
    data = _smoke()
    if field == "runtime.documents":
        for c in data["dataset"]["corpora"].values():
            c["max_documents"] = 2
    problems = _problems(_set(data, field, value))
    assert len(problems) == 1 and problems[0].startswith(names), problems


def test_every_shipped_config_still_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name == "ablation.yaml":  # an ablation spec, not an experiment config
            continue
        cfg = load_config(path, REPO)
        assert check_files(cfg) == [], path


def test_alert_command_takes_an_argv_list_or_a_string():
    for cmd in (["notify-send", "mcx alert"], "cat > /dev/null"):
        assert parse_config(_set(_smoke(), "alerts.command", cmd), "c", REPO).alerts.command == cmd


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text((REPO / "configs" / "smoke.yaml").read_text() + "\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, REPO)
    assert "duplicate key 'seed'" in err.value.problems[0]
    res = _mcx("validate-config", path, cwd=REPO)
    assert "duplicate key 'seed'" in _one_line_error(res)


def test_unwritable_artifacts_dir_and_impossible_runtime_steps_are_file_problems(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("word " * 2000)  # 10 kB: at most 10 000 tokens
    data = _smoke()
    data["artifacts_dir"] = str(tmp_path / "a_file" / "artifacts")
    data["dataset"]["corpora"] = {"mine": {"source": str(tmp_path / "docs" / "*.txt")}}
    data["runtime"]["steps"] = 1000
    data["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"}
    problems = check_files(parse_config(data, "c", tmp_path))
    assert any(p.startswith("artifacts_dir:") and "not a directory" in p for p in problems), problems
    assert any(p.startswith("mlflow.tracking_uri:") and "not a directory" in p for p in problems), problems
    assert any(p.startswith("runtime.steps:") and "10000 bytes" in p for p in problems), problems
    data["runtime"]["steps"] = 5
    data["artifacts_dir"] = str(tmp_path / "fine")
    data["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'fine' / 'mlflow.db'}"}
    assert check_files(parse_config(data, "c", tmp_path)) == []


# ---------------------------------------------------------------------------------------------- strict JSON


def test_strict_json_has_no_nan_and_knows_numpy():
    obj = {"a": float("nan"), "b": [float("inf"), 1.0], "c": np.float32(2.5), "d": np.arange(3), "e": (1, None),
           "f": Path("/x"), 3: np.bool_(True), "g": np.float64("nan")}
    text = dumps_strict(obj)
    assert loads_strict(text) == {"a": None, "b": [None, 1.0], "c": 2.5, "d": [0, 1, 2], "e": [1, None],
                                  "f": "/x", "3": True, "g": None}
    assert to_jsonable(math.nan) is None
    with pytest.raises(TypeError):
        dumps_strict({"x": object()})
    assert dumps_strict({"x": object()}, default=lambda o: "obj") == '{"x": "obj"}'
    with pytest.raises(ValueError):
        loads_strict('{"a": NaN}')


# ---------------------------------------------------------------------------------------------- errors


def test_environment_errors_are_one_line_and_exit_2():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/ck/model.safetensors")
    msg, code = describe_error(full)
    assert code == 2 and msg.startswith("no space left on device: /data/ck/model.safetensors")
    msg, code = describe_error(RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
                                            "failed writing file data/0: file write failed"))
    assert code == 2 and "no space left on device?" in msg
    wrapped = ValueError("while saving")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/ro/x")
    assert describe_error(wrapped) == ("permission denied: /ro/x", 2)
    assert describe_error(OSError(errno.EROFS, "Read-only file system", "/ro"))[0].startswith("read-only")
    assert describe_error(KeyError("k"))[1] == 1


def test_the_top_level_handler_hides_tracebacks_unless_debug(tmp_path):
    @click.command("boom")
    @click.argument("kind")
    def boom(kind):
        if kind == "disk":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))
        raise ZeroDivisionError("division by zero")

    @click.group(cls=McxGroup, commands=[boom])
    @click.option("--debug", is_flag=True)
    @click.pass_context
    def grp(ctx, debug):
        ctx.obj = {"debug": debug}

    runner = CliRunner()
    res = runner.invoke(grp, ["boom", "disk"])
    assert "no space left on device" in _one_line_error(res, 2)
    res = runner.invoke(grp, ["boom", "bug"])
    assert "--debug" in _one_line_error(res, 1)
    res = runner.invoke(grp, ["--debug", "boom", "bug"])
    assert isinstance(res.exception, ZeroDivisionError)  # re-raised: the traceback is shown
    assert "--debug" in main.params[0].opts


def test_cli_one_line_errors_for_bad_paths(tmp_path, smoke_config):
    cfg = smoke_config(tmp_path, artifacts=True)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "t.txt").write_text(shakespeare_play(3000))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01binary")
    (tmp_path / "ck" / "gistnet").mkdir(parents=True)
    (tmp_path / "ck" / "lensnet").mkdir()
    runner = CliRunner()
    cases = [
        (["validate-config", tmp_path / "nope.yaml"], "not found"),
        (["run", "--config", cfg, "--checkpoint", tmp_path / "ck", "--text", tmp_path / "t.txt",
          "--trace", tmp_path / "a_file" / "t.jsonl"], "not a directory"),
        (["run", "--config", cfg, "--checkpoint", tmp_path / "ck", "--text", tmp_path / "missing.txt",
          "--trace", tmp_path / "t.jsonl"], "no such file"),
        (["eval-text", "--config", cfg, "--checkpoint", tmp_path / "ck", "--text", tmp_path / "bin.txt"], "binary"),
        (["eval-text", "--config", cfg, "--checkpoint", tmp_path / "ck", "--text", tmp_path], "directory"),
        (["explain", "--config", cfg, "--checkpoint", tmp_path / "ck", "--text", tmp_path / "t.txt",
          "--w-max", "5"], "cannot hold"),
        (["query", "SELECT 1", "--artifacts", tmp_path / "nope"], "no such directory"),
    ]
    for args, says in cases:
        res = runner.invoke(main, [str(a) for a in args])
        assert says in _one_line_error(res), (args, res.output)


def test_materialize_with_a_selection_matching_nothing_is_an_error(tmp_path, smoke_config, monkeypatch):
    cfg = smoke_config(tmp_path, artifacts=True)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / ".dagster_home"))
    for sel, says in (("no_such_asset", "no_such_asset"), ("a b ((", "Invalid selection"),
                      ("tag:nothing=here", "matches no asset")):
        res = _mcx("materialize", "--config", cfg, "--select", sel, cwd=tmp_path)
        assert says in _one_line_error(res), res.stderr


def test_a_failed_blocking_check_prints_no_dagster_trace(capfd):
    import dagster as dg

    @dg.asset
    def a():
        return 1

    @dg.asset_check(asset=a, blocking=True)
    def c():
        return dg.AssetCheckResult(passed=False, description="too big by 3")

    @dg.asset(deps=[a])
    def b():
        return 2

    with dg.DagsterInstance.ephemeral() as inst, condensed_dagster_logs(debug=False):
        res = dg.materialize([a, b, c], instance=inst, raise_on_error=False)
    assert not res.success
    err = capfd.readouterr().err
    assert "Stack Trace" not in err and "DagsterAssetCheckFailedError" not in err and "Traceback" not in err
    with dg.DagsterInstance.ephemeral() as inst, condensed_dagster_logs(debug=True):
        dg.materialize([a, b, c], instance=inst, raise_on_error=False)
    assert "DagsterAssetCheckFailedError" in capfd.readouterr().err  # --debug keeps them


# ---------------------------------------------------------------------------------------------- text


def test_streamed_tokens_equal_the_whole_text_tokens(tokenizer, tmp_path):
    rnd = np.random.default_rng(0)
    bits = ["  ", "\n\n", "\t\n\n", "word", " é", "日本", "    def f(a):\n", "1234567", "'s", "!!", " "]
    text = shakespeare_play(20000) + "".join(rnd.choice(bits) for _ in range(6000))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for chunk in (700, 4096, 1 << 18):
        assert list(stream_token_ids(path, tokenizer, None, chunk_bytes=chunk)) == whole, chunk
        prefix, ids = stream_token_prefix(path, tokenizer, 3000, chunk_bytes=chunk)
        assert len(ids) >= 3000 and list(ids) == whole[: len(ids)]
        assert tokenizer(prefix, add_special_tokens=False)["input_ids"] == list(ids)


def test_the_stream_stops_once_it_has_the_tokens(tokenizer, tmp_path):
    path = tmp_path / "big.txt"
    play = shakespeare_play(100_000).encode()
    # ~6 MB of text, then bytes that are not UTF-8: only a full read meets them.
    path.write_bytes(play * 60 + b"\xff\xfe broken tail")
    ids = stream_token_ids(path, tokenizer, 544)
    assert len(ids) == 544
    with pytest.raises(TextError, match="not UTF-8"):
        stream_token_ids(path, tokenizer, None)


@pytest.mark.parametrize("content, says", [(b"", "empty"), (b"  \n\t ", "empty"), (b"ab\x00cd", "binary"),
                                           (b"ok \xc3\x28 bad", "not UTF-8")])
def test_bad_text_files_are_text_errors(tokenizer, tmp_path, content, says):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(TextError, match=says):
        stream_token_ids(path, tokenizer, 10)


# ---------------------------------------------------------------------------------------------- MLflow


def test_parent_run_search_escapes_quotes(tmp_path):
    from mcx_core.telemetry.mlflow_sink import MLflowSink, exact_matches, filter_equals, mlflow_client
    from mcx_core.tools.compare import resolve_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    art = str(tmp_path / "artifacts")
    ids = {}
    for key in ("bob's smoke", 'say "hi"', "back\\slash'", "bob_s smoke", "x' OR '1'='1"):
        first, created = MLflowSink.parent(uri, "bob's smoke", key, run_name=key, artifact_location=art)
        again, created_again = MLflowSink.parent(uri, "bob's smoke", key, run_name=key, artifact_location=art)
        assert created and not created_again and again.run_id == first.run_id, key
        ids[key] = first.run_id
        first.end("FINISHED")
    assert len(set(ids.values())) == len(ids)  # "bob_s smoke" is not "bob's smoke"
    client = mlflow_client(uri)
    for key, run_id in ids.items():
        run, _ = resolve_run(client, key)
        assert run.info.run_id == run_id, key
    exp = client.get_experiment_by_name("bob's smoke").experiment_id
    runs = client.search_runs([exp], filter_string=filter_equals("tags.`mcx.training_loop`", "bob's smoke"))
    assert [r.info.run_id for r in exact_matches(runs, "bob's smoke", tag="mcx.training_loop")] == [ids["bob's smoke"]]
