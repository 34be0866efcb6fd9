"""Every YAML in cluster/ parses and names only real fields and real resources.

- cluster/aws.yaml against the cluster-config JSON schema that ships inside the installed
  ray package (ray/autoscaler/ray-schema.json) and Ray's own ``validate_config``;
- the KubeRay manifests against the field sets of the KubeRay ``ray.io/v1`` CRDs (below);
- every RayJob entrypoint against the real ``thinkfast`` argument parser;
- resources: GPU node types / worker groups exist exactly where a job asks for GPUs and
  fit what it asks; the search service's replicas fit its worker group;
- the RayService's serveConfigV2 is cluster/serve.yaml verbatim, and Serve accepts it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAYJOBS = sorted(KUBERAY.glob("rayjob-*.yaml"))

# ---------------------------------------------------------------------------------------
# KubeRay ray.io/v1 field sets, from the CRD Go types (json tags) in ray-project/kuberay,
# ray-operator/apis/ray/v1/: rayjob_types.go @ f6ef3f7b (RayJobSpec), raycluster_types.go
# @ 3275ee09 (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions),
# rayservice_types.go @ 834fe3a8 (RayServiceSpec) -- the KubeRay v1.3 API. Each object
# lists *all* its fields, so any real field passes and a misspelt or invented one fails.
# Pod templates are Kubernetes core/v1; only the subset of PodSpec/Container fields these
# manifests may reasonably use is listed (a new one must be added here on purpose).
# ---------------------------------------------------------------------------------------
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITIES = {"type": "object", "additionalProperties": {"type": "string"}}  # "8", "32Gi"


def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_CONTAINER = _obj(
    {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "workingDir": {"type": "string"},
        "env": {"type": "array", "items": _obj({"name": {"type": "string"}, "value": {"type": "string"}, "valueFrom": {"type": "object"}}, ("name",))},
        "envFrom": {"type": "array"},
        "ports": {"type": "array", "items": _obj({"containerPort": {"type": "integer"}, "name": {"type": "string"}, "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}, ("containerPort",))},
        "resources": _obj({"requests": _QUANTITIES, "limits": _QUANTITIES}),
        "volumeMounts": {"type": "array"},
        "lifecycle": {"type": "object"},
        "securityContext": {"type": "object"},
    },
    ("name", "image"),
)
_POD_TEMPLATE = _obj(
    {
        "metadata": _obj({"labels": _STR_MAP, "annotations": _STR_MAP}),
        "spec": _obj(
            {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "initContainers": {"type": "array", "items": _CONTAINER},
                "serviceAccountName": {"type": "string"},
                "nodeSelector": _STR_MAP,
                "tolerations": {
                    "type": "array",
                    "items": _obj(
                        {
                            "key": {"type": "string"},
                            "operator": {"enum": ["Exists", "Equal"]},
                            "value": {"type": "string"},
                            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                            "tolerationSeconds": {"type": "integer"},
                        }
                    ),
                },
                "affinity": {"type": "object"},
                "volumes": {"type": "array"},
                "imagePullSecrets": {"type": "array"},
                "terminationGracePeriodSeconds": {"type": "integer"},
            },
            ("containers",),
        ),
    },
    ("spec",),
)
_AUTOSCALER_OPTIONS = _obj(
    {
        "resources": {"type": "object"},
        "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"},
        "securityContext": {"type": "object"},
        "idleTimeoutSeconds": {"type": "integer"},
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
    }
)
_RAY_CLUSTER_SPEC = _obj(
    {
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "autoscalerOptions": _AUTOSCALER_OPTIONS,
        "headServiceAnnotations": _STR_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": _obj(
            {
                "template": _POD_TEMPLATE,
                "headService": {"type": "object"},
                "enableIngress": {"type": "boolean"},
                "rayStartParams": _STR_MAP,  # KubeRay wants every value a string
                "serviceType": {"type": "string"},
            },
            ("template", "rayStartParams"),
        ),
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {
            "type": "array",
            "items": _obj(
                {
                    "suspend": {"type": "boolean"},
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "idleTimeoutSeconds": {"type": "integer"},
                    "rayStartParams": _STR_MAP,
                    "template": _POD_TEMPLATE,
                    "scaleStrategy": _obj({"workersToDelete": {"type": "array", "items": {"type": "string"}}}),
                    "numOfHosts": {"type": "integer", "minimum": 1},
                },
                ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"),
            ),
        },
    },
    ("headGroupSpec",),
)
_METADATA = _obj({"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP}, ("name",))
RAYJOB_SCHEMA = _obj(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": _METADATA,
        "spec": _obj(
            {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": _RAY_CLUSTER_SPEC,
                "submitterPodTemplate": _POD_TEMPLATE,
                "metadata": _STR_MAP,
                "clusterSelector": _STR_MAP,
                "submitterConfig": _obj({"backoffLimit": {"type": "integer"}}),
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "deletionPolicy": {"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]},
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
            },
            ("entrypoint", "rayClusterSpec"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)
RAYSERVICE_SCHEMA = _obj(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": _METADATA,
        "spec": _obj(
            {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": _RAY_CLUSTER_SPEC,
                "serviceUnhealthySecondThreshold": {"type": "integer"},
                "deploymentUnhealthySecondThreshold": {"type": "integer"},
                "serveService": {"type": "object"},
            },
            ("serveConfigV2", "rayClusterConfig"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

# vCPUs and GPUs of the EC2 instance types aws.yaml may use (AWS instance-type specs)
EC2_INSTANCES: dict[str, tuple[int, int]] = {
    "m5.large": (2, 0),
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "c6i.4xlarge": (16, 0),
    "c6i.8xlarge": (32, 0),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8),
}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _all_yaml() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _group_capacity(group: dict) -> tuple[float, int]:
    """(CPUs, GPUs) one pod of the group gives Ray: KubeRay reads them from the limits."""
    limits = _containers(group)[0]["resources"]["limits"]
    cpus = float(group["rayStartParams"].get("num-cpus", _cpu(limits["cpu"])))
    return cpus, int(limits.get("nvidia.com/gpu", "0"))


def _job_commands(entrypoint: str) -> list[list[str]]:
    """``python -m thinkfast_pipelines.cli SUB FLAGS... && ...`` -> [[SUB, FLAGS...], ...]."""
    commands = []
    for part in re.split(r"\s*&&\s*", entrypoint.strip()):
        argv = shlex.split(part)
        assert argv[:3] == ["python", "-m", "thinkfast_pipelines.cli"], f"entrypoint must run the thinkfast CLI: {part!r}"
        commands.append(argv[3:])
    return commands


def _parse(argv: list[str]):
    """Parse with the real ``thinkfast`` parser; argparse errors fail the test loudly."""
    from thinkfast_pipelines.cli import build_parser

    try:
        return build_parser(argv[0]).parse_args(argv)
    except SystemExit as exc:  # argparse prints the offending flag to stderr
        pytest.fail(f"thinkfast rejects {shlex.join(argv)!r} (exit {exc.code})")


# ----------------------------------------------------------------------------- parsing


def test_every_yaml_in_cluster_parses():
    paths = _all_yaml()
    names = {p.relative_to(CLUSTER).as_posix() for p in paths}
    assert {"aws.yaml", "serve.yaml", "kuberay/rayservice.yaml", "kuberay/rayjob-embed.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-index.yaml"} <= names
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1 and isinstance(docs[0], dict), path


def test_no_credentials_in_any_config():
    for path in [*_all_yaml(), CLUSTER / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|AKIA[0-9A-Z]{16}", text), path


# ------------------------------------------------------------------- cluster launcher


def test_launcher_config_matches_the_schema_shipped_with_ray():
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    config = _load(CLUSTER / "aws.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)  # Ray's own checks on top (head type exists, etc.)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["provider"]["type"] == "aws"


def test_launcher_resources_match_instances_and_jobs():
    config = _load(CLUSTER / "aws.yaml")
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    for name, node_type in types.items():
        vcpus, gpus = EC2_INSTANCES[node_type["node_config"]["InstanceType"]]
        resources = node_type["resources"]
        assert resources.get("CPU", vcpus) <= vcpus, name
        assert resources.get("GPU", 0) == gpus, f"{name}: GPU instances must declare their GPUs, CPU ones none"
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", config["max_workers"]), name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU worker type for embed / train"
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) >= 4 for t in workers.values()), "no CPU worker type for decoding"
    # the embed job's actor request (from the RayJob, the same flags a user submits) fits a GPU node
    embed = vars(_parse(_job_commands(_load(KUBERAY / "rayjob-embed.yaml")["spec"]["entrypoint"])[0]))
    assert any(
        t["resources"].get("GPU", 0) >= embed["gpus_per_actor"] and t["resources"]["CPU"] >= embed["cpus_per_actor"]
        for t in workers.values()
    )


def test_launcher_installs_the_package_and_uses_instance_roles():
    config = _load(CLUSTER / "aws.yaml")
    assert config["file_mounts"] == {"~/thinkfast": "."}
    setup = " && ".join(config["setup_commands"])
    assert "pip install -e ~/thinkfast" in setup and "torch==2.13.0" in setup
    for excluded in (".venv", ".git"):
        assert excluded in config["rsync_exclude"]
    head = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        if name != head:  # the head gets Ray's auto-created profile; workers need one named
            assert "IamInstanceProfile" in node_type["node_config"], f"{name} has no S3 access"


# -------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("path", [*RAYJOBS, KUBERAY / "rayservice.yaml"], ids=lambda p: p.name)
def test_kuberay_manifest_uses_only_crd_fields(path):
    doc = _load(path)
    jsonschema.validate(doc, RAYSERVICE_SCHEMA if doc["kind"] == "RayService" else RAYJOB_SCHEMA)


def test_there_is_a_rayjob_per_pipeline_stage():
    stages = {_job_commands(_load(p)["spec"]["entrypoint"])[0][0] for p in RAYJOBS}
    assert {"embed", "train-slow", "index"} <= stages


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoints_are_valid_thinkfast_commands(path):
    for argv in _job_commands(_load(path)["spec"]["entrypoint"]):
        args = _parse(argv)
        uris = [v for v in vars(args).values() if isinstance(v, str) and ("/" in v)]
        assert uris and all(u.startswith("s3://") for u in uris), f"cluster jobs must not use node-local paths: {uris}"


def _gpu_request(argv: list[str]) -> tuple[int, float, int]:
    """(GPUs per worker/actor, CPUs per worker/actor, how many) a command asks for."""
    args = vars(_parse(argv))
    if args.get("device") == "cuda":
        return int(args["gpus_per_actor"] or 1), float(args["cpus_per_actor"]), int(args["actors"])
    if args.get("use_gpu"):
        return 1, float(args["cpus_per_worker"] or 1), int(args["workers"] or 1)
    return 0, 0.0, 0


@pytest.mark.parametrize("path", [*RAYJOBS, KUBERAY / "rayservice.yaml"], ids=lambda p: p.name)
def test_kuberay_resources_exist_where_jobs_ask_for_them(path):
    import ray

    import thinkfast

    doc = _load(path)
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__, "cluster Ray must match the client's"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "keep data tasks off the head"
    groups = spec["workerGroupSpecs"]
    for group in [head, *groups]:
        for container in _containers(group):
            assert container["image"] == f"thinkfast/ray:{thinkfast.__version__}"
            res = container["resources"]
            assert res["limits"] == res["requests"], "Ray sizes itself from limits: request what it will use"
    gpu_groups = [g for g in groups if _group_capacity(g)[1] > 0]
    for group in gpu_groups:
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), f"{group['groupName']} cannot land on GPU nodes"
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    requests = [_gpu_request(argv) for argv in _job_commands(doc["spec"]["entrypoint"])] if doc["kind"] == "RayJob" else []
    wants_gpu = [r for r in requests if r[0] > 0]
    assert bool(wants_gpu) == bool(gpu_groups), "GPU worker groups exactly where a job asks for GPUs"
    for gpus, cpus, count in wants_gpu:
        fitting = [g for g in gpu_groups if _group_capacity(g)[1] >= gpus and _group_capacity(g)[0] >= cpus]
        assert fitting, f"no group gives {gpus} GPU + {cpus} CPU per worker"
        slots = sum(g["maxReplicas"] * (_group_capacity(g)[1] // gpus) for g in fitting)
        assert slots >= count, f"{count} GPU workers requested, the groups can grow to {slots}"


# ------------------------------------------------------------------------ RayService


def test_rayservice_serve_config_is_serve_yaml_verbatim():
    import runpy

    serve_text = (CLUSTER / "serve.yaml").read_text()
    embedded = _load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"]
    assert embedded == serve_text, "run: python cluster/sync_serve_config.py"
    sync = runpy.run_path(str(CLUSTER / "sync_serve_config.py"))
    assert sync["main"](["--check"]) == 0


def test_serve_yaml_is_a_config_serve_run_accepts_and_fits_the_rayservice_cluster():
    from ray.serve.schema import ServeDeploySchema

    from thinkfast_pipelines.serve.args import ServeArgs

    config = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    spec = _load(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    pod_cpus = min(_group_capacity(g)[0] for g in spec["workerGroupSpecs"])
    max_cpus = sum(g["maxReplicas"] * _group_capacity(g)[0] for g in spec["workerGroupSpecs"])
    index_job = vars(_parse(_job_commands(_load(KUBERAY / "rayjob-index.yaml")["spec"]["entrypoint"])[0]))
    for app in config["applications"]:
        path = app["import_path"]  # "pkg.module:attr" or "pkg.module.attr"
        module = path.split(":")[0] if ":" in path else path.rsplit(".", 1)[0]
        assert importlib.util.find_spec(module) is not None, path
        args = ServeArgs.model_validate(app["args"])
        assert args.index == index_job["out"], "the service must read the index the index job writes"
        sizes = [args.ingress, args.encoder, args.catalog]
        need = sum(s.num_replicas * s.num_cpus for s in sizes)
        need += index_job["shards"] * args.retriever.num_replicas * args.retriever.num_cpus
        need += args.reranker.max_replicas * args.reranker.num_cpus
        assert max(s.num_cpus for s in [*sizes, args.retriever, args.reranker]) <= pod_cpus, "a replica fits no pod"
        assert need <= max_cpus, f"at max replicas Serve needs {need} CPUs, the cluster can grow to {max_cpus}"
        assert args.reranker.max_replicas > args.reranker.min_replicas, "the re-ranker must be able to scale"
