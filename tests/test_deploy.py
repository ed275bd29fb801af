"""The deployment files in `deploy/` are usable: each YAML parses, the Dagster instance validates against
Dagster's own instance schema, the accelerate config loads with accelerate's own loader, secrets are
read from the environment, and every command in deploy/README.md names files and entry points that exist."""

import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
INSTANCE = DEPLOY / "dagster-multi-node.yaml"
ENV_VARS = ["DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB",
            "DAGSTER_COMPUTE_LOG_BUCKET", "MCX_IMAGE"]

# dagster-k8s / dagster-aws are not installed here: their documented config keys (dagster 1.13).
K8S_RUN_LAUNCHER_KEYS = {
    "instance_config_map", "postgres_password_secret", "dagster_home", "load_incluster_config",
    "kubeconfig_file", "fail_pod_on_run_failure", "job_namespace", "only_allow_user_defined_k8s_config_fields",
    "only_allow_user_defined_env_vars", "run_k8s_config", "job_image", "image_pull_policy", "image_pull_secrets",
    "service_account_name", "env_config_maps", "env_secrets", "env_vars", "volume_mounts", "volumes", "labels",
    "resources", "scheduler_name", "security_context",
}
S3_COMPUTE_LOG_KEYS = {
    "bucket", "local_dir", "prefix", "use_ssl", "verify", "verify_cert_path", "endpoint_url", "skip_empty_files",
    "upload_interval", "upload_extra_args", "show_url_only", "region",
}


def _load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_yaml_parses_to_a_mapping(name):
    assert isinstance(_load(DEPLOY / name), dict)


def test_deploy_folder_has_the_promised_files():
    for name in ("dagster-multi-node.yaml", "accelerate-multi-gpu.yaml", "mlflow-compose.yaml", "README.md",
                 "workspace-multi-node.yaml", "mlflow.env.example"):
        assert (DEPLOY / name).is_file(), name


@pytest.fixture
def instance_config(tmp_path, monkeypatch):
    """The instance YAML validated by Dagster's own loader (schema + env-var resolution)."""
    from dagster._core.instance.config import dagster_instance_config

    for var in ENV_VARS:
        monkeypatch.setenv(var, f"value-of-{var.lower()}")
    shutil.copy(INSTANCE, tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    return config


def test_dagster_instance_validates_against_dagsters_schema(instance_config):
    from dagster._config import Shape, process_config
    from dagster._core.instance.config import dagster_instance_config_schema

    storage = instance_config["storage"]
    assert set(storage) == {"postgres"}  # dagster_postgres's run, event-log and schedule storage
    # Env-var sources resolve (the fixture set them), as they do when the instance starts.
    resolved = process_config(Shape(dagster_instance_config_schema()), _load(INSTANCE))
    assert resolved.success, resolved.errors
    db = resolved.value["storage"]["postgres"]["postgres_db"]
    assert db["password"] == "value-of-dagster_pg_password" and db["port"] == 5432


def test_dagster_instance_needs_its_secrets_in_the_environment(monkeypatch):
    from dagster._config import Shape, process_config
    from dagster._core.instance.config import dagster_instance_config_schema

    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    resolved = process_config(Shape(dagster_instance_config_schema()), _load(INSTANCE))
    assert not resolved.success
    assert any("DAGSTER_PG_PASSWORD" in e.message for e in resolved.errors)


def test_dagster_instance_rejects_an_unknown_key(tmp_path):
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config

    bad = _load(INSTANCE)
    bad["run_lancher"] = bad.pop("run_launcher")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(DagsterInvalidConfigError):
        dagster_instance_config(str(tmp_path))


def test_dagster_instance_takes_secrets_from_the_environment():
    data = _load(INSTANCE)
    for path, value in _walk(data):
        if re.search(r"password|secret_key|access_key|hostname|username|db_name|bucket", path, re.IGNORECASE):
            if path.endswith("postgres_password_secret"):
                continue  # the name of a Kubernetes Secret, not a secret
            assert path.endswith(".env"), f"{path}: {value!r} must come from an env var ({{env: NAME}})"


def test_run_coordinator_config_matches_its_class(instance_config):
    from dagster._config import validate_config
    from dagster._serdes.config_class import class_from_code_pointer

    rc = instance_config["run_coordinator"]
    cls = class_from_code_pointer(rc["module"], rc["class"])
    assert cls.__name__ == "QueuedRunCoordinator"
    result = validate_config(cls.config_type(), rc["config"])
    assert result.success, result.errors


def test_run_launcher_and_compute_logs_name_real_classes(instance_config):
    from dagster._config import validate_config
    from dagster._serdes.config_class import class_from_code_pointer

    launcher, logs = instance_config["run_launcher"], instance_config["compute_logs"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert (logs["module"], logs["class"]) == ("dagster_aws.s3.compute_log_manager", "S3ComputeLogManager")
    for entry, known in ((launcher, K8S_RUN_LAUNCHER_KEYS), (logs, S3_COMPUTE_LOG_KEYS)):
        if importlib.util.find_spec(entry["module"].split(".")[0]) is not None:
            cls = class_from_code_pointer(entry["module"], entry["class"])
            result = validate_config(cls.config_type(), entry["config"])
            assert result.success, result.errors
        else:
            assert set(entry["config"]) <= known, set(entry["config"]) - known
    assert {"job_namespace", "instance_config_map", "postgres_password_secret"} <= set(launcher["config"])
    assert launcher["config"]["run_k8s_config"]["container_config"]["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_workspace_validates_and_names_the_code_location():
    from dagster._config import validate_config
    from dagster._core.workspace.config_schema import WORKSPACE_CONFIG_SCHEMA

    data = _load(DEPLOY / "workspace-multi-node.yaml")
    assert validate_config(WORKSPACE_CONFIG_SCHEMA, data).success
    local = _load(ROOT / "workspace.yaml")
    assert data["load_from"][0]["grpc_server"]["location_name"] == local["load_from"][0]["python_module"]["location_name"]


def test_accelerate_config_loads_with_accelerates_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(DEPLOY / "accelerate-multi-gpu.yaml"))
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_machines == 1 and cfg.num_processes > 1
    assert load_config_from_file(str(DEPLOY / "accelerate-multi-gpu.yaml")).num_processes == cfg.num_processes
    import mcx_cli.main as entry_point

    assert callable(getattr(entry_point, cfg.main_training_function))


def test_mlflow_compose_uses_postgres_and_an_artifact_store_without_literal_secrets():
    data = _load(DEPLOY / "mlflow-compose.yaml")
    assert {"postgres", "mlflow", "minio"} <= set(data["services"])
    command = data["services"]["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in command and "--artifacts-destination s3://" in command
    for path, value in _walk(data):
        if re.search(r"PASSWORD|SECRET|_USER$", path):
            assert isinstance(value, str) and value.startswith("${"), f"{path} must come from the env file"
    example = (DEPLOY / "mlflow.env.example").read_text()
    for var in sorted(set(re.findall(r"\$\{(\w+)\}", (DEPLOY / "mlflow-compose.yaml").read_text()))):
        assert f"{var}=" in example, var


def _readme_commands() -> list[list[str]]:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(shlex.split(line))
    inline = re.findall(r"`((?:dagster|dagster-webserver|dagster-daemon|pip) [^`]+)`", text)
    return commands + [shlex.split(c) for c in inline]


def test_readme_commands_name_files_and_modules_that_exist():
    commands = _readme_commands()
    assert any(c[:2] == [".venv/bin/accelerate", "launch"] for c in commands)
    for cmd in commands:
        for arg in cmd:
            if re.match(r"^(deploy|configs)/[\w./-]+$", arg) and not arg.endswith("mlflow.env"):
                assert (ROOT / arg).exists(), f"{' '.join(cmd)}: {arg} does not exist"
        for flag in ("-m",):
            if flag in cmd:
                module = cmd[cmd.index(flag) + 1]
                assert importlib.util.find_spec(module) is not None, f"{' '.join(cmd)}: no module {module}"
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for path in re.findall(r"`((?:deploy|mcx_core|mcx_cli|tests)/[\w./-]+\.(?:yaml|py|md|example))`", text):
        assert (ROOT / path).exists(), path


def test_readme_launch_commands_parse_with_the_real_parsers():
    import click
    from accelerate.commands.launch import launch_command_parser

    from mcx_cli.main import main as mcx

    def parse_mcx(argv: list[str]) -> None:  # the `mcx` command's own parsers; runs nothing
        command = mcx.get_command(click.Context(mcx), argv[0])
        assert command is not None, argv
        command.make_context(argv[0], list(argv[1:]))

    for cmd in _readme_commands():
        if cmd[:2] == [".venv/bin/accelerate", "launch"]:
            args = launch_command_parser().parse_args(cmd[2:])
            assert args.module and args.training_script == "mcx_cli" and args.training_script_args[0] == "train-cycles"
            assert (ROOT / args.config_file).is_file()
            parse_mcx(args.training_script_args)
        elif cmd[0] == ".venv/bin/mcx":
            parse_mcx(cmd[1:])
