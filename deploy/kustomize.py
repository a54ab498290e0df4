#!/usr/bin/env python3
"""Render a kustomization the way `kubectl kustomize DIR` does, for the features vdiff's use.

    python deploy/kustomize.py deploy/kubernetes/overlays/cpu > rendered.yaml

Containers cannot be built or deployed on the machines this project is tested on, and kubectl is
not a Python package; this renderer lets the tests (and anyone without kubectl) read exactly
what an overlay applies. It supports what `deploy/kubernetes/` uses and refuses anything else by
name: `resources` (files and kustomization directories), `labels` (on metadata only),
`images` (newName, newTag), and `patches`, either a strategic-merge file or an inline JSON patch
(add, replace, remove) with a `target` of kind and name. Where kubectl is installed, a test
checks that both render the same objects.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]
SUPPORTED = {"apiVersion", "kind", "resources", "labels", "images", "patches"}
# strategic merge: the lists merged element by element on this key; other lists are replaced
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
    "tolerations": "key",
}


class KustomizeError(ValueError):
    """A kustomization this renderer does not support, or one that is wrong."""


def render(directory: Path) -> list[Object]:
    """Every object of the kustomization in `directory`, transformed as kustomize would."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}/kustomization.yaml: {sorted(unknown)} not supported here")
    objects = [obj for entry in spec.get("resources", []) for obj in _resource(directory / entry)]
    for patch in spec.get("patches", []):
        _apply_patch(directory, patch, objects)
    for image in spec.get("images", []):
        for container in _containers(objects):
            if container.get("image", "").split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    for label_set in spec.get("labels", []):
        if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
            raise KustomizeError("labels: only metadata labels are supported (includeSelectors false)")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
    return objects


def _resource(path: Path) -> list[Object]:
    if path.is_dir():
        return render(path)
    return [obj for obj in yaml.safe_load_all(path.read_text()) if obj]


def _apply_patch(directory: Path, patch: Object, objects: list[Object]) -> None:
    if "path" in patch:
        strategic = yaml.safe_load((directory / patch["path"]).read_text())
        target = _find(objects, strategic["kind"], strategic["metadata"]["name"])
        merged = _merge(target, strategic)
        target.clear()
        target.update(merged)
        return
    operations = yaml.safe_load(patch["patch"])
    selector = patch.get("target", {})
    for obj in objects:
        if all(obj.get(k) == v or obj.get("metadata", {}).get(k) == v for k, v in selector.items()):
            for operation in operations:
                _json_patch(obj, operation)


def _merge(base: Any, patch: Any, key: str = "") -> Any:
    """Strategic merge: maps merged key by key, MERGE_KEYS lists element by element, others replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for name, value in patch.items():
            merged[name] = _merge(base[name], value, name) if name in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        field = MERGE_KEYS[key]
        merged_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next((i for i, old in enumerate(merged_list) if old.get(field) == item.get(field)), None)
            if match is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[match] = _merge(merged_list[match], item)
        return merged_list
    return copy.deepcopy(patch)


def _json_patch(obj: Object, operation: Object) -> None:
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    if op == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), operation["value"])
    elif op in ("add", "replace") and isinstance(node, dict):
        node[last] = operation["value"]
    elif op == "replace" and isinstance(node, list):
        node[int(last)] = operation["value"]
    elif op == "remove":
        del node[int(last) if isinstance(node, list) else last]
    else:
        raise KustomizeError(f"JSON patch {operation} not supported here")


def _find(objects: list[Object], kind: str, name: str) -> Object:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise KustomizeError(f"a patch names {kind}/{name}, which no resource defines")


def _containers(objects: list[Object]) -> Iterator[Object]:
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        yield from pod.get("containers", [])
        yield from pod.get("initContainers", [])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    print(yaml.safe_dump_all(render(Path(argv[0])), sort_keys=True), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
