"""deploy/: every manifest renders and validates offline, and agrees with the CLI and the images.

- The kustomize overlays render (deploy/kustomize.py; the same objects as `kubectl kustomize`
  where kubectl is installed) and every object validates against the Kubernetes 1.37 JSON
  schemas that the `kubernetes-validate` package ships, strictly (no unknown fields).
- The KServe resources validate against KServe's CRD schemas (tests/data/kserve-crds/), with
  unknown fields refused as the API server's strict field validation would.
- Every container's arguments parse with vdiff's own parser.
- Ports, probe paths and the shutdown timing agree across the manifests, the Dockerfiles and the
  CLI's defaults: each is read from its file here, so none can drift alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT
from vdiff.serve.cli import build_parser, split_command

sys.path.insert(0, str(ROOT / "deploy"))
from kustomize import KustomizeError, render  # noqa: E402

KUBERNETES = "1.37.0"
OVERLAYS = sorted((ROOT / "deploy" / "kubernetes" / "overlays").iterdir())
KSERVE = sorted((ROOT / "deploy" / "kserve").glob("*.yaml"))
CRDS = ROOT / "tests" / "data" / "kserve-crds"
HEALTH_PATHS = {
    "/health",
    "/ping",
}  # the OpenAI server's probe routes (client/vdiff_client/server.py)
TRITON_HEALTH_PATHS = {"/v2/health/ready", "/v2/health/live"}

Object = dict[str, Any]


def rendered(overlay: Path) -> list[Object]:
    return render(overlay)


def kserve_objects() -> list[Object]:
    return [obj for path in KSERVE for obj in yaml.safe_load_all(path.read_text()) if obj]


def pod_specs() -> Iterator[tuple[str, Object]]:
    """(where, pod spec) of every workload: the overlays' Deployments and the KServe runtimes."""
    for overlay in OVERLAYS:
        for obj in rendered(overlay):
            if obj["kind"] == "Deployment":
                yield f"{overlay.name}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]
    for obj in kserve_objects():
        if obj["kind"] == "ClusterServingRuntime":
            yield f"kserve/{obj['metadata']['name']}", obj["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay: Path) -> None:
    objects = rendered(overlay)
    assert {o["kind"] for o in objects} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_the_schema_check_refuses_an_unknown_field() -> None:
    deployment = next(o for o in rendered(OVERLAYS[0]) if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_python_renderer_matches_kubectl_kustomize(overlay: Path) -> None:
    output = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True)
    theirs = [o for o in yaml.safe_load_all(output.stdout) if o]

    def key(obj: Object) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(rendered(overlay), key=key) == sorted(theirs, key=key)


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)


def crd_schema(kind: str) -> Object:
    """The storage version's openAPIV3Schema of the CRD for `kind`."""
    for path in CRDS.glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            if crd and crd["spec"]["names"]["kind"] == kind:
                version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
                return version["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {kind} in {CRDS}")


def unknown_fields(value: Any, schema: Object, path: str = "") -> Iterator[str]:
    """Fields the schema does not declare: the API server's strict field validation refuses them."""
    if isinstance(value, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return
        for name, item in value.items():
            if name not in schema["properties"]:
                if path != "" or name not in ("apiVersion", "kind", "metadata"):
                    yield f"{path}.{name}"
                continue
            yield from unknown_fields(item, schema["properties"][name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{index}]")


@pytest.mark.parametrize("path", KSERVE, ids=lambda p: p.name)
def test_every_kserve_resource_validates_against_its_crd(path: Path) -> None:
    for obj in yaml.safe_load_all(path.read_text()):
        schema = crd_schema(obj["kind"])
        jsonschema.validate(obj, schema)
        assert list(unknown_fields(obj, schema)) == []


def test_the_crd_check_refuses_an_unknown_field() -> None:
    runtime = next(o for o in kserve_objects() if o["kind"] == "ClusterServingRuntime")
    runtime["spec"]["supportedModelFormat"] = []
    assert list(unknown_fields(runtime, crd_schema("ClusterServingRuntime"))) == [".spec.supportedModelFormat"]


def vdiff_arguments(container: Object) -> list[str]:
    """The arguments the image's `vdiff` entrypoint receives (`command: [vdiff]` passes them too)."""
    command = container.get("command", ["vdiff"])
    assert command == ["vdiff"], command
    return [re.sub(r"\{\{\.Name\}\}", "served-name", arg) for arg in container["args"]]


@pytest.mark.parametrize(("where", "pod"), list(pod_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_container_arguments_parse_with_vdiffs_parser(where: str, pod: Object) -> None:
    for container in pod["containers"]:
        command, ours, _ = split_command(vdiff_arguments(container))
        args = build_parser(command).parse_args(ours)
        assert args.model == "/mnt/models", where


def parsed(pod: Object) -> tuple[str, Any]:
    command, ours, _ = split_command(vdiff_arguments(pod["containers"][0]))
    return command, build_parser(command).parse_args(ours)


@pytest.mark.parametrize(("where", "pod"), list(pod_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_ports_and_probes_point_at_the_port_vdiff_listens_on(where: str, pod: Object) -> None:
    command, args = parsed(pod)
    container = pod["containers"][0]
    http_port = args.port if command == "serve" else args.triton_http_port
    declared = {p["containerPort"] for p in container["ports"]}
    assert http_port in declared, where
    paths = HEALTH_PATHS if command == "serve" else TRITON_HEALTH_PATHS
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        action = container[probe]["httpGet"]
        assert action["path"] in paths, (where, probe)
        assert action["port"] in (http_port, *[p.get("name") for p in container["ports"]]), (
            where,
            probe,
        )
    if command == "triton":
        assert args.triton_grpc_port in declared, where


@pytest.mark.parametrize(("where", "pod"), list(pod_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_grace_period_outlasts_the_pre_stop_sleep_and_the_drain(where: str, pod: Object) -> None:
    _, args = parsed(pod)
    sleep = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod.get("terminationGracePeriodSeconds")
    if grace is None:  # a runtime: each InferenceService sets it on its predictor
        graces = [
            o["spec"]["predictor"]["terminationGracePeriodSeconds"]
            for o in kserve_objects()
            if o["kind"] == "InferenceService"
        ]
        grace = min(graces)
    assert grace > sleep + args.exit_timeout, where


def test_the_metrics_annotations_name_the_port_that_serves_metrics() -> None:
    for overlay in OVERLAYS:
        deployment = next(o for o in rendered(overlay) if o["kind"] == "Deployment")
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        _, args = parsed(deployment["spec"]["template"]["spec"])
        assert int(annotations["prometheus.io/port"]) == args.port
    for obj in kserve_objects():
        if obj["kind"] == "ClusterServingRuntime":
            command, args = parsed(obj["spec"])
            port = args.port if command == "serve" else args.triton_metrics_port
            assert int(obj["spec"]["annotations"]["prometheus.kserve.io/port"]) == port


def dockerfile_port(name: str) -> tuple[int, int]:
    """(EXPOSE, the entrypoint's --port) of a Dockerfile."""
    text = (ROOT / name).read_text()
    exposed = int(re.search(r"^EXPOSE (\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    entry = re.search(r"^ENTRYPOINT \[(.*)\]", text, re.M).group(1)  # type: ignore[union-attr]
    arguments = [a.strip().strip('"') for a in entry.split(",")][1:]
    return exposed, build_parser("serve").parse_args(arguments).port


def test_the_images_the_cli_and_the_manifests_agree_on_the_port() -> None:
    default = build_parser("serve").parse_args([]).port
    assert dockerfile_port("Dockerfile.triton") == dockerfile_port("Dockerfile") == (default, default)
    for overlay in OVERLAYS:
        objects = rendered(overlay)
        service = next(o for o in objects if o["kind"] == "Service")
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        _, args = parsed(deployment["spec"]["template"]["spec"])
        assert service["spec"]["ports"][0]["port"] == args.port == default
