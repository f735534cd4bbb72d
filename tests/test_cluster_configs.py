"""Offline checks of the cluster configs in cluster/: nothing is launched, no cloud or Kubernetes API is called.

(a) the Ray cluster launcher configs (AWS, GCP) against Ray's ray-schema.json, and through Ray's own
    prepare/validate step; (b) every KubeRay overlay (GKE and EKS, RayCluster and RayJob), built with
    `kubectl kustomize`, against the CRDs' OpenAPI schemas in ../shared/schemas/kuberay/ (unknown fields
    refused, as `kubectl apply --validate=strict` does), plus the operator's own rules that a schema
    cannot say and what each provider needs (storage class, GPU nodes, workload identity); (c) the fit
    check: every resource request the stages of jobs/configs/msmarco-qwen32b.yaml make fits a node type
    of every cluster, read the way Ray's autoscalers read them, with negative controls; (d) security: no
    dashboard on 0.0.0.0 where a port-forward is the way in, token auth on, no credentials in cluster/.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import jsonschema
import pytest
import yaml

from utilrag.config import AnnotateConfig, PipelineConfig, load_config
from utilrag.paths import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"
AWS = CLUSTER / "aws-autoscaler.yaml"
GCP = CLUSTER / "gcp-autoscaler.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
LAUNCHERS = [AWS, GCP]


@dataclass(frozen=True)
class Overlay:
    """cluster/kuberay/overlays/<provider>-<base>: what `kubectl apply -k` applies."""

    provider: str  # gke | eks
    base: str  # raycluster | rayjob

    @property
    def path(self) -> Path:
        return CLUSTER / "kuberay" / "overlays" / self.name

    @property
    def name(self) -> str:
        return f"{self.provider}-{self.base}"

    stem = name


KUBERAY = [Overlay(p, b) for p in ("gke", "eks") for b in ("raycluster", "rayjob")]
RAYCLUSTER, RAYJOB = Overlay("gke", "raycluster"), Overlay("gke", "rayjob")
PAPER = REPO_ROOT / "jobs" / "configs" / "msmarco-qwen32b.yaml"
GPU_LOCK = REPO_ROOT / "requirements" / "gpu.lock"
KUBERAY_SCHEMAS = REPO_ROOT.parent / "shared" / "schemas" / "kuberay"
SHARED_MOUNT = "/mnt/cluster_storage"
UNBOUNDED = 10**9  # a request for no resources at all
IMAGE = "rayproject/ray:2.60.0-py311-gpu"

# What the machines named in the configs have (vCPU, GPUs, Ray accelerator label of the GPU, memory GB):
# a config may promise Ray no more than this. A100-80G: Ray detects "A100" only; the 80 GB label is ours.
MACHINES = {
    "m6i.4xlarge": (16, 0, None, 64),
    "m6i.8xlarge": (32, 0, None, 128),
    "p4de.24xlarge": (96, 8, "A100-80G", 1152),
    "p4d.24xlarge": (96, 8, "A100-40G", 1152),
    "p5.48xlarge": (192, 8, "H100", 2048),
    "p5e.48xlarge": (192, 8, "H200", 2048),
    "a3-highgpu-8g": (208, 8, "H100", 1872),
    "n2-standard-16": (16, 0, None, 64),
    "n2-standard-32": (32, 0, None, 128),
    "a2-ultragpu-1g": (12, 1, "A100-80G", 170),
    "a2-ultragpu-8g": (96, 8, "A100-80G", 1360),
    "a2-highgpu-1g": (12, 1, "A100-40G", 85),
}
# GKE's accelerator node label for each Ray accelerator label (nvidia-tesla-a100 is the 40 GB card),
# and the a2 machine family that carries it (GPUs per VM -> its vCPU and memory).
GKE_ACCELERATOR = {"A100-80G": "nvidia-a100-80gb", "A100-40G": "nvidia-tesla-a100"}
GKE_A100_80GB_MACHINES = {1: "a2-ultragpu-1g", 8: "a2-ultragpu-8g"}


def docs(path: Path | Overlay) -> list[dict]:
    """A YAML file's documents, or what an overlay builds to."""
    if isinstance(path, Overlay):
        return copy.deepcopy(_built(path))
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@functools.cache
def _built(overlay: Overlay) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize built in) builds the KubeRay overlays offline"
    built = subprocess.run([kubectl, "kustomize", str(overlay.path)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def kind(path: Path | Overlay, name: str) -> dict:
    (found,) = [d for d in docs(path) if d.get("kind") == name]
    return found


def ray_cluster_spec(path: Overlay) -> dict:
    """The RayCluster spec of a RayCluster or RayJob manifest."""
    if path.base == "rayjob":
        return kind(path, "RayJob")["spec"]["rayClusterSpec"]
    return kind(path, "RayCluster")["spec"]


def groups(spec: dict) -> list[tuple[dict, bool]]:
    return [(spec["headGroupSpec"], True)] + [(g, False) for g in spec.get("workerGroupSpecs", [])]


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


# ----------------------------------------------------------------------------- (a) launcher schema
@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_config_matches_rays_schema(path):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # Ray's own step before `ray up`: merged with the provider's defaults.yaml, then validated
    # (head type among the node types, max_workers >= the min_workers, the Docker section).
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # A section left out would be taken from defaults.yaml (e.g. a pip install of a nightly Ray wheel):
    # every command that runs must be one written here.
    ours = set(config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"])
    assert set(prepared["head_setup_commands"]) <= ours and set(prepared["worker_setup_commands"]) <= ours
    assert prepared["initialization_commands"] == config["initialization_commands"]


def test_launcher_configs_carry_their_first_run_prerequisites():
    """What `ray up` needs before the first worker can start and mount the shared volume, read from the
    configs: AWS: the head's own instance profile (iam:PassRole for the workers' role: with the one
    `ray up` makes, every worker launch fails), one security group made beforehand on every node (so
    the EFS mount targets can admit it before the head mounts); GCP: each GPU type waits for the
    driver its image installs at first boot before Docker starts, then mounts like the others. Both:
    spot capacity beside on-demand (same shape and labels), Hopper types beside the A100 ones."""
    aws = yaml.safe_load(AWS.read_text(encoding="utf-8"))
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"]["Arn"].endswith(":instance-profile/utilrag-head")
    workers = {n: t for n, t in types.items() if n != aws["head_node_type"]}
    assert {t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for t in workers.values()} == {
        "utilrag-worker"
    }
    assert {tuple(t["node_config"]["SecurityGroupIds"]) for t in types.values()} == {("sg-YOUR-RAY-NODES",)}
    assert "mount -t nfs4" in " ".join(aws["initialization_commands"])

    gcp = yaml.safe_load(GCP.read_text(encoding="utf-8"))
    for name, node in gcp["available_node_types"].items():
        if node["resources"].get("GPU"):
            wait, *rest = node["initialization_commands"]
            assert "nvidia-smi" in wait and "exit 1" in wait, name  # waits, then fails loudly
            assert rest == gcp["initialization_commands"], name  # and mounts like every other node
            items = {i["key"]: i["value"] for i in node["node_config"]["metadata"]["items"]}
            assert items["install-nvidia-driver"] == "True"
        else:
            assert "initialization_commands" not in node, name

    for config, spot_of in (
        (aws, lambda c: c.get("InstanceMarketOptions", {}).get("MarketType") == "spot"),
        (gcp, lambda c: c.get("scheduling", {}).get("provisioningModel") == "SPOT"),
    ):
        types = config["available_node_types"]
        spot = [n for n, t in types.items() if spot_of(t["node_config"])]
        assert spot, "no spot / preemptible worker type"
        for name in spot:
            on_demand = types[name.removesuffix("-spot")]
            assert not spot_of(on_demand["node_config"])
            assert (types[name]["resources"], types[name]["labels"]) == (on_demand["resources"], on_demand["labels"])
        accelerators = {
            k.split(":", 1)[1] for t in types.values() for k in t["resources"] if k.startswith("accelerator_type:")
        }
        assert {"A100-80G", "H100"} <= accelerators, accelerators
        # the cluster cap leaves room for every type's own cap
        assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_installs_the_lock_into_the_python_it_was_resolved_for(path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["docker"]["image"] == IMAGE  # CPython 3.11, the lock's Python (Ubuntu 22.04's is 3.10)
    assert config["file_mounts"]["~/utilrag/requirements"] == "./requirements"
    setup = " ; ".join(config["setup_commands"])
    assert "sys.version_info[:2] == (3, 11)" in setup
    assert "pip install -q --no-deps -r ~/utilrag/requirements/gpu.lock" in setup
    head = " ; ".join(config["head_setup_commands"])
    # the head's autoscaler imports the provider's client library, at the lock's versions (boto3 is in
    # the lock itself, for the folder lease on s3://; google-api-python-client only on the head)
    client = {"aws": "boto3", "gcp": "google-api-python-client"}[config["provider"]["type"]]
    assert f"'{client}" in head and "-c ~/utilrag/requirements/gpu.lock" in head
    in_lock = bool(re.search(rf"^{client}==", GPU_LOCK.read_text(), re.M))
    assert in_lock == (client == "boto3"), client


def test_one_image_one_lock_one_ray_everywhere():
    lock = GPU_LOCK.read_text(encoding="utf-8")
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", lock, re.M))
    assert "--python-version 3.11 " in lock and "py311" in IMAGE  # the Python the lock was resolved for
    assert IMAGE.split(":")[1].startswith(pins["ray"] + "-")
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(rf"^FROM {re.escape(IMAGE)}$", dockerfile, re.M)
    assert "pip install --no-cache-dir --no-deps -r /home/ray/utilrag/requirements/gpu.lock" in dockerfile
    for path in KUBERAY:
        spec = ray_cluster_spec(path)
        assert spec["rayVersion"] == pins["ray"]
        images = {c["image"] for group, _ in groups(spec) for c in group["template"]["spec"]["containers"]}
        assert len(images) == 1, f"{path.name}: one image (cluster/Dockerfile) for every pod, got {images}"


def test_gpu_lock_pairs_torch_with_its_own_builds():
    """torchaudio / torchvision builds belong to one torch release: the lock holds the matching ones or none."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", GPU_LOCK.read_text(encoding="utf-8"), re.M))
    major, minor = (int(x) for x in pins["torch"].split(".")[:2])
    if "torchaudio" in pins:
        assert pins["torchaudio"].split(".")[:2] == [str(major), str(minor)], pins["torchaudio"]
    if "torchvision" in pins:
        assert pins["torchvision"].split(".")[:2] == ["0", str(minor + 15)], pins["torchvision"]
    assert len(re.findall(r"^faiss-", GPU_LOCK.read_text(encoding="utf-8"), re.M)) == 1


# ----------------------------------------------------------------------------- (b) KubeRay CRDs
def _strict(node):
    """An OpenAPI v3 CRD schema as JSON Schema: x-kubernetes-* keys dropped, and objects with declared
    properties closed (the API server prunes unknown fields, `kubectl apply --validate=strict` refuses
    them). int-or-string fields already carry anyOf [integer, string]; their pattern binds strings only."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not str(k).startswith("x-kubernetes-")}
    if (
        isinstance(node.get("properties"), dict)
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schema(filename: str) -> dict:
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS}")
    with gzip.open(KUBERAY_SCHEMAS / filename, "rt", encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def schema_errors(manifest: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda o: o.name)
def test_kuberay_manifest_matches_the_crd(path):
    kind_name, crd = {
        "raycluster": ("RayCluster", "ray.io_rayclusters.yaml.gz"),
        "rayjob": ("RayJob", "ray.io_rayjobs.yaml.gz"),
    }[path.base]
    schema = crd_schema(crd)
    manifest = kind(path, kind_name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert schema_errors(manifest, schema) == []
    # the strict schema is not toothless: a misspelt field is refused
    broken = copy.deepcopy(manifest)
    spec = broken["spec"]["rayClusterSpec"] if kind_name == "RayJob" else broken["spec"]
    spec["workerGroupSpecs"][0]["rayStartParam"] = spec["workerGroupSpecs"][0].pop("rayStartParams")
    assert any("rayStartParam" in e for e in schema_errors(broken, schema))


@pytest.mark.parametrize("path", KUBERAY, ids=lambda o: o.name)
def test_kuberay_operator_rules(path):
    """What the operator's own validation refuses (ray-operator/controllers/ray/utils/validation.go)."""
    for manifest in docs(path):
        name = manifest["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, name
    spec = ray_cluster_spec(path)
    assert spec["enableInTreeAutoscaling"] is True
    assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52, 0)  # authOptions needs it
    for group, is_head in groups(spec):
        params, resources = group.get("rayStartParams", {}), group.get("resources", {})
        assert not (resources and {"num-cpus", "num-gpus", "memory", "resources"} & params.keys())
        assert "labels" not in params
        if not is_head:
            assert 0 <= group["minReplicas"] <= group["maxReplicas"]
    if path.base == "rayjob":
        job = kind(path, "RayJob")["spec"]
        assert job["shutdownAfterJobFinishes"] is True and not job.get("clusterSelector")
        # the run's config from the ConfigMap mounted on the head (where the driver runs), not the image
        assert job["entrypoint"] == "python jobs/submit.py pipeline --config /home/ray/config/pipeline.yaml"
        head = spec["headGroupSpec"]["template"]["spec"]
        volumes = {v["name"]: v for v in head["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/home/ray/config"]]["configMap"] == {"name": "utilrag-pipeline"}
        assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": "/home/ray/utilrag"}
        if job.get("submissionMode") == "SidecarMode":
            assert spec["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") == "Never"
            assert "submitterPodTemplate" not in job and "submitterConfig" not in job
        # the image holds the code the entrypoint runs
        dockerfile = DOCKERFILE.read_text(encoding="utf-8")
        for part in ("pkg", "jobs"):
            assert f"COPY --chown=ray:users {part} /home/ray/utilrag/{part}" in dockerfile


def test_kuberay_gpu_pods_are_80gb_a100s_with_what_ray_is_told():
    from ray.autoscaler._private.kuberay.autoscaling_config import _node_type_from_group_spec

    for path in KUBERAY:
        for group, is_head in groups(ray_cluster_spec(path)):
            pod = group["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            resources = _node_type_from_group_spec(group, is_head)["resources"]  # the autoscaler's reading
            assert resources.get("GPU", 0) == gpus
            labels = {k.split(":", 1)[1]: v for k, v in resources.items() if k.startswith("accelerator_type:")}
            if not gpus:
                assert not labels
                continue
            # KubeRay's documented quoting: '"{\"name\": n}"' (the autoscaler strips the outer quotes
            # and the backslashes; the shell of `ray start` does the same)
            assert re.fullmatch(r'"\{(\\"[^"\\]+\\": \d+(, )?)+\}"', group["rayStartParams"]["resources"])
            assert labels == {"A100-80G": gpus}, f"{path.name}/{group['groupName']}: {labels}"
            if path.provider == "gke":  # the A100 80GB node pool: a2-ultragpu VMs of this many GPUs
                assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": GKE_ACCELERATOR["A100-80G"]}
                vcpu, _, _, memory_gb = MACHINES[GKE_A100_80GB_MACHINES[gpus]]
                assert resources["CPU"] < vcpu and resources["memory"] < memory_gb * 1e9 * 0.95
            else:  # EKS: p4de.24xlarge nodes (8 x A100 80GB, 96 vCPU, 1,152 GiB), as many pods as GPUs fit
                (machine,) = [v for k, v in pod["nodeSelector"].items() if k == "node.kubernetes.io/instance-type"]
                vcpu, node_gpus, accelerator, memory_gib = MACHINES[machine]
                assert accelerator == "A100-80G" and node_gpus % gpus == 0
                pods = node_gpus // gpus
                assert pods * resources["CPU"] < vcpu and pods * resources["memory"] < memory_gib * 2**30 * 0.95
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


STORAGE_CLASS = {"gke": "standard-rwx", "eks": "utilrag-efs"}  # Filestore CSI; EFS CSI (its class in the overlay)
IDENTITY = {"gke": "iam.gke.io/gcp-service-account", "eks": "eks.amazonaws.com/role-arn"}


def test_every_pod_mounts_shared_storage_and_shm():
    for path in KUBERAY:
        (pvc,) = [d for d in docs(path) if d["kind"] == "PersistentVolumeClaim"]
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]
        assert pvc["spec"]["storageClassName"] == STORAGE_CLASS[path.provider], path.name
        for group, is_head in groups(ray_cluster_spec(path)):
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            claim = volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"]
            assert claim == pvc["metadata"]["name"]
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            # the volume is the pods' user's: fsGroup (block volumes, EFS access points) and, for an NFS
            # share's root-owned root, the head's init container, which runs before any worker exists
            assert pod["securityContext"]["fsGroup"] == 100
            if is_head:
                (init,) = pod["initContainers"]
                assert (
                    init["securityContext"] == {"runAsUser": 0}
                    and "chown 1000:100 " + SHARED_MOUNT in init["command"][-1]
                )
                assert {m["mountPath"] for m in init["volumeMounts"]} == {SHARED_MOUNT}
            # GPU pods: room for the model's node-local copy
            limits = pod["containers"][0]["resources"]["limits"]
            if "nvidia.com/gpu" in limits:
                assert limits["ephemeral-storage"] == pod["containers"][0]["resources"]["requests"]["ephemeral-storage"]
    for provider in ("gke", "eks"):  # the RayCluster and the RayJob of a provider claim the same volume
        claims = [
            [d for d in docs(Overlay(provider, b)) if d["kind"] == "PersistentVolumeClaim"]
            for b in ("raycluster", "rayjob")
        ]
        assert claims[0] == claims[1]
    (efs,) = [d for d in docs(Overlay("eks", "raycluster")) if d["kind"] == "StorageClass"]
    assert efs["metadata"]["name"] == "utilrag-efs" and efs["provisioner"] == "efs.csi.aws.com"
    assert efs["reclaimPolicy"] == "Retain"  # deleting an overlay's claim keeps the outputs
    assert efs["parameters"]["provisioningMode"] == "efs-ap" and (
        efs["parameters"]["uid"],
        efs["parameters"]["gid"],
    ) == ("1000", "100")


def test_pods_take_their_cloud_identity_from_their_service_account():
    """Workload Identity (GKE) / IRSA (EKS): every pod runs as the service account the overlay binds to a
    cloud role, so no long-lived key is needed; the head's NetworkPolicy admits only Ray pods and the
    operator (to the dashboard port)."""
    for path in KUBERAY:
        (account,) = [d for d in docs(path) if d["kind"] == "ServiceAccount"]
        assert set(account["metadata"]["annotations"]) == {IDENTITY[path.provider]}, path.name
        for group, _ in groups(ray_cluster_spec(path)):
            assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
        (policy,) = [d for d in docs(path) if d["kind"] == "NetworkPolicy"]
        assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/node-type": "head"}}
        rays, operator = policy["spec"]["ingress"]
        assert rays == {"from": [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]}
        assert operator["ports"] == [{"port": 8265, "protocol": "TCP"}]
    for path in LAUNCHERS:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        init = " ; ".join(config["initialization_commands"])  # on the host, before Docker starts
        assert re.search(rf"mount -t nfs4? .* {SHARED_MOUNT}$", init, re.M)
        assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in config["docker"]["run_options"]


# ----------------------------------------------------------------------------- (c) fit
@dataclass
class Request:
    what: str
    resources: dict[str, float]  # one bundle: must land on one node
    accelerator: str | None  # a node advertising accelerator_type:<this> is required
    at_once: int  # how many must be placed together (a training gang, the minimum replicas)


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    count: int  # how many the autoscaler may run


def replica_request(what: str, acfg: AnnotateConfig) -> Request:
    """One vLLM replica as utilrag.annotate.engine.actor_resources places it (and Ray Data's defaults)."""
    from utilrag.annotate.engine import actor_resources

    kwargs = actor_resources(acfg)
    try:  # Ray Data's defaults for a map actor's remote args (a GPU actor still reserves 1 CPU)
        from ray.data._internal.execution.operators.map_operator import _canonicalize_ray_remote_args

        remote = _canonicalize_ray_remote_args({k: v for k, v in kwargs.items() if k in ("num_cpus", "num_gpus")})
    except ImportError:
        remote = {"num_cpus": 1, **{k: v for k, v in kwargs.items() if k in ("num_cpus", "num_gpus")}}
    resources = {"CPU": remote.get("num_cpus", 1), "GPU": remote.get("num_gpus", 0)}
    if "ray_remote_args_fn" in kwargs:  # tp x pp > 1: a placement group, every bundle on one node
        captured: dict = {}

        def placement_group(bundles, strategy="PACK", **_):
            captured.update(bundles=bundles, strategy=strategy)
            return object()

        with mock.patch("ray.util.placement_group", placement_group):
            kwargs["ray_remote_args_fn"]()
        assert captured["strategy"] == "STRICT_PACK"
        resources = {}
        for bundle in captured["bundles"]:
            for key, value in bundle.items():
                resources[key] = resources.get(key, 0) + value
    return Request(f"{what} replica", resources, kwargs.get("accelerator_type"), acfg.scale.replicas[0])


def stage_requests(cfg: PipelineConfig) -> list[Request]:
    """Every resource request the configured stages make, one entry per kind of actor / worker."""
    from utilrag.pipeline import configured

    out = []
    if configured(cfg, "annotate"):
        assert cfg.annotate is not None
        out.append(replica_request("annotate", cfg.annotate))
    if configured(cfg, "rag"):
        assert cfg.rag is not None
        rag = AnnotateConfig(model=cfg.rag.model, engine=cfg.rag.engine, scale=cfg.rag.scale)
        out.append(replica_request("rag", rag))
    if configured(cfg, "train"):
        t = cfg.train  # recipe.py: resources_per_worker; all workers run at once (DDP / DeepSpeed gang)
        worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
        out.append(Request("train worker", worker, None, t.num_workers))
    if configured(cfg, "index"):
        i = cfg.index
        # encode.py: GPU encoders ask for 1 GPU and no CPU; CPU encoders for the cluster's CPUs divided
        # among the pool *as the cluster is when the stage starts* -- modelled here as its floor, 1.
        out.append(Request("index encoder", {"GPU": 1} if i.use_gpu else {"CPU": 1}, None, i.encoders))
        cpus = 0 if i.use_gpu else (i.cpus_per_shard if i.cpus_per_shard is not None else (i.threads_per_shard or 1))
        out.append(Request("index shard", {"CPU": cpus, "GPU": 1 if i.use_gpu else 0}, None, i.shards))
    return out


def per_node(request: Request, node: NodeType) -> int:
    """How many of the request one node of this type holds (0: it does not fit)."""
    if request.accelerator and node.resources.get(f"accelerator_type:{request.accelerator}", 0) <= 0:
        return 0
    wanted = {k: v for k, v in request.resources.items() if v}
    if any(node.resources.get(k, 0) < v for k, v in wanted.items()):
        return 0
    return min((int(node.resources[k] // v) for k, v in wanted.items()), default=UNBOUNDED)


def fit_problems(cfg: PipelineConfig, nodes: list[NodeType]) -> list[str]:
    problems = []
    for request in stage_requests(cfg):
        label = f" on accelerator_type:{request.accelerator}" if request.accelerator else ""
        hosts = [(n, per_node(request, n)) for n in nodes]
        hosts = [(n, k) for n, k in hosts if k]
        if not hosts:
            problems.append(f"{request.what} {request.resources}{label} fits no node type")
            continue
        capacity = sum(min(k, request.at_once) * n.count for n, k in hosts)
        if capacity < request.at_once:
            problems.append(f"{request.what}: the cluster holds {capacity} of the {request.at_once} needed at once")
    return problems


def launcher_nodes(path: Path) -> list[NodeType]:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        NodeType(name, dict(t["resources"]), 1 if name == config["head_node_type"] else t.get("max_workers", 0))
        for name, t in config["available_node_types"].items()
    ]


def kuberay_nodes(path: Overlay) -> list[NodeType]:
    """Each group as Ray's KubeRay autoscaler reads it (CPU / GPU / memory from the pod, custom resources
    from rayStartParams.resources)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _node_type_from_group_spec

    out = []
    for group, is_head in groups(ray_cluster_spec(path)):
        node_type = _node_type_from_group_spec(group, is_head)
        out.append(
            NodeType(group.get("groupName", "head"), node_type["resources"], 1 if is_head else group["maxReplicas"])
        )
    return out


CLUSTERS = {
    "aws": lambda: launcher_nodes(AWS),
    "gcp": lambda: launcher_nodes(GCP),
    **{f"kuberay-{o.name}": functools.partial(lambda o: kuberay_nodes(o), o) for o in KUBERAY},
}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_node_types_promise_only_what_the_machines_have(path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name, node_type in config["available_node_types"].items():
        machine = node_type["node_config"].get("InstanceType") or node_type["node_config"]["machineType"]
        vcpu, gpus, accelerator, _ = MACHINES[machine]
        resources = node_type["resources"]
        if name == config["head_node_type"]:
            assert resources == {"CPU": 0} and gpus == 0, "the head is a CPU node that runs no work"
            continue
        assert node_type["min_workers"] == 0  # every worker type scales from zero
        assert 0 < resources["CPU"] <= vcpu  # stated, so the fit check reads real numbers (GCP fills none in)
        assert resources.get("GPU", 0) == gpus
        labels = {k.split(":", 1)[1]: v for k, v in resources.items() if k.startswith("accelerator_type:")}
        assert labels == ({accelerator: gpus} if gpus else {}), f"{name}: {labels}"


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_every_stage_of_the_paper_config_fits(cluster):
    cfg = load_config(PAPER)
    requests = stage_requests(cfg)
    # what this config runs: annotation, training, and the trained model's encoders and GPU shards
    assert {r.what for r in requests} == {"annotate replica", "train worker", "index encoder", "index shard"}
    (replica,) = [r for r in requests if r.what == "annotate replica"]
    assert replica.resources == {"CPU": 1, "GPU": 1} and replica.accelerator == "A100-80G"
    assert fit_problems(cfg, CLUSTERS[cluster]()) == []


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_fit_check_refuses_a_replica_larger_than_any_node(cluster):
    nodes = CLUSTERS[cluster]()
    too_many = int(max(n.resources.get("GPU", 0) for n in nodes)) * 2
    cfg = load_config(PAPER, [f"annotate.engine.tensor_parallel_size={too_many}"])
    (replica,) = [r for r in stage_requests(cfg) if r.what == "annotate replica"]
    assert replica.resources["GPU"] == too_many  # tp x pp GPUs on one node
    assert any(p.startswith("annotate replica") and "fits no node type" in p for p in fit_problems(cfg, nodes))


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_fit_check_refuses_an_accelerator_no_node_advertises(cluster):
    cfg = load_config(PAPER, ["annotate.engine.accelerator_type=B200"])  # no config has Blackwell nodes
    assert any("accelerator_type:B200" in p for p in fit_problems(cfg, CLUSTERS[cluster]()))


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_fit_check_refuses_a_training_gang_larger_than_the_cluster(cluster):
    cfg = load_config(PAPER, ["train.num_workers=1000"])
    assert any(p.startswith("train worker: the cluster holds") for p in fit_problems(cfg, CLUSTERS[cluster]()))


def test_tensor_parallel_2_needs_pods_with_2_gpus():
    """The issue's defect: one GPU per pod, so a TP=2 replica (2 GPUs on one node) never fits a KubeRay pod (while the
    8-GPU VMs of the launcher configs hold it)."""
    cfg = load_config(PAPER, ["annotate.engine.tensor_parallel_size=2"])
    assert fit_problems(cfg, kuberay_nodes(RAYCLUSTER)) != []
    assert fit_problems(cfg, launcher_nodes(AWS)) == [] and fit_problems(cfg, launcher_nodes(GCP)) == []


def test_output_dir_is_on_storage_every_cluster_mounts():
    cfg = load_config(PAPER)
    from utilrag.pipeline import configured
    from utilrag.store import is_remote

    # the paper config writes its stages' outputs to the shared volume every cluster mounts (each stage
    # also runs with output_dir on s3:// / gs://: tests/test_object_storage.py)
    writing = [s for s in ("annotate", "train", "evaluate", "index", "rag") if configured(cfg, s)]
    assert writing and not is_remote(cfg.output_dir)
    assert Path(cfg.output_dir).is_relative_to(SHARED_MOUNT)


# ----------------------------------------------------------------------------- (d) security
def test_dashboard_is_not_on_every_interface():
    for path in [*CLUSTER.rglob("*.yaml"), *KUBERAY]:
        values = [s for d in docs(path) for s in strings(d)]
        assert not any("0.0.0.0" in s for s in values), path.name
    for path in LAUNCHERS:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        head = " ".join(config["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` (SSH port-forward)
    for path in KUBERAY:
        head = ray_cluster_spec(path)["headGroupSpec"]
        if path.base == "raycluster":
            assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"  # reached with kubectl port-forward
        else:  # the RayJob's operator polls the job through the head Service, so its dashboard keeps
            # KubeRay's pod-network binding; it must then be token-protected and stay inside the cluster
            assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    for path in KUBERAY:
        assert ray_cluster_spec(path)["authOptions"] == {"mode": "token"}


def test_token_auth_is_on_for_every_ray_node():
    for path in LAUNCHERS:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
            (start,) = [c for c in commands if "ray start" in c]
            assert "RAY_AUTH_MODE=token ray start" in start
        assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # a path, not a value


SECRET_PATTERNS = [
    re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])"),  # AWS access key ids
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\"private_key\"\s*:"),  # a GCP service account key file
    re.compile(r"\b(ghp|gho|github_pat|hf)_[A-Za-z0-9_]{30,}"),
    re.compile(r"(?i)RAY_AUTH_TOKEN=(?!\$)\S+"),
]


def secrets_in(text: str) -> list[str]:
    return [m.group(0) for pattern in SECRET_PATTERNS for m in pattern.finditer(text)]


def test_no_credentials_in_cluster_files():
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert secrets_in(f"aws_access_key_id = {fake_key}") == [fake_key]  # the scanner finds one
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file():
            assert secrets_in(path.read_text(encoding="utf-8")) == [], path.name
    for path in KUBERAY:
        for group, _ in groups(ray_cluster_spec(path)):
            for container in group["template"]["spec"]["containers"]:
                for env in container.get("env", []):  # secrets only by reference
                    if re.search(r"(?i)key|secret|token|password|credential", env["name"]):
                        assert "value" not in env, f"{path.name}: {env['name']} has a literal value"
                for source in container.get("envFrom", []):
                    assert set(source) == {"secretRef"}
    for path in LAUNCHERS:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert "gcp_credentials" not in config["provider"]
        for node_type in config["available_node_types"].values():
            assert not {"AccessKey", "SecretKey", "credentials"} & set(node_type["node_config"])
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^(ENV|ARG)\s+\S*(KEY|SECRET|TOKEN|PASSWORD)", dockerfile, re.M | re.I)
    assert not re.search(r"^(COPY|ADD)\s+(--\S+\s+)*\.\s", dockerfile, re.M), "copy named paths, not the whole tree"


def test_every_node_type_is_labelled_cpu_or_gpu_by_what_it_holds():
    """ray.node_labels (on in the paper config) needs every worker type labelled utilrag-node: gpu when
    it has GPUs, cpu otherwise; KubeRay's autoscaler reads the group's top-level labels."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _node_type_from_group_spec

    for path in LAUNCHERS:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        for name, node in config["available_node_types"].items():
            if name == config["head_node_type"]:
                continue
            want = "gpu" if node["resources"].get("GPU") else "cpu"
            assert node.get("labels", {}).get("utilrag-node") == want, (path.name, name)
    for path in KUBERAY:
        for group, is_head in groups(ray_cluster_spec(path)):
            if is_head:
                continue
            node_type = _node_type_from_group_spec(group, is_head)
            want = "gpu" if node_type["resources"].get("GPU") else "cpu"
            assert node_type["labels"].get("utilrag-node") == want, (path.name, group["groupName"])
    assert load_config(REPO_ROOT / "jobs" / "configs" / "msmarco-qwen32b.yaml").ray.node_labels


def test_node_labels_send_cpu_work_to_cpu_nodes_and_replicas_to_gpu_nodes():
    """With ray.node_labels: every Ray Data dataset asks for cpu nodes (its tasks and Ray Data's own
    scale-up requests), a GPU replica for gpu nodes (its operator-level selector, which Ray Data lets win
    over the dataset's on the same key); off: none."""
    import ray.data

    from utilrag.annotate.engine import actor_resources
    from utilrag.raycluster import node_selector, use_node_labels

    gpu = AnnotateConfig(model="m", engine={"use_gpu": True})
    try:
        use_node_labels(True)
        assert ray.data.DataContext.get_current().execution_options.label_selector == {"utilrag-node": "cpu"}
        assert actor_resources(gpu)["label_selector"] == {"utilrag-node": "gpu"}
        assert node_selector(False) == {"utilrag-node": "cpu"}
    finally:
        use_node_labels(False)
    assert ray.data.DataContext.get_current().execution_options.label_selector is None
    assert "label_selector" not in actor_resources(gpu) and node_selector(True) == {}
