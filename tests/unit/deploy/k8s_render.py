"""A small kustomize for tests: resources, namespace, images and strategic-merge patches.

Implements exactly what deploy/k8s uses (the kustomization schema rejects anything else),
so the overlays can be rendered and validated without kubectl or a network.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

# Strategic-merge-patch merge keys of the list fields we use (from the Kubernetes API's
# x-kubernetes-patch-merge-key); lists not named here are replaced by the patch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name"}
# Service ports merge on `port`, container ports on `containerPort`.
PORT_KEYS = ("containerPort", "port")
CLUSTER_SCOPED = {"Namespace"}
_POD_OWNERS = {"Deployment", "StatefulSet"}


class RenderError(ValueError):
    """The kustomization uses something this renderer does not implement, or a patch misses."""


def _load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise RenderError(f"{path}: every YAML document must be a mapping")
    return docs


def resource_id(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _merge_key(field: str, base: list, patch: list) -> str | None:
    if field in MERGE_KEYS:
        return MERGE_KEYS[field]
    if field == "ports":
        items = [i for i in base + patch if isinstance(i, dict)]
        for key in PORT_KEYS:
            if items and all(key in i for i in items):
                return key
    return None


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Merge `patch` into `base` (copies): maps recursively, null deletes, keyed lists by key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise RenderError(f"directive {key!r} is only supported at a patch's top level")
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = _strip_nulls(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = _merge_key(field, base, patch)
        if key is None:
            return _strip_nulls(patch)
        out = list(base)
        for item in patch:
            index = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if index is None:
                out.append(_strip_nulls(item))
            else:
                out[index] = strategic_merge(out[index], item)
        return out
    return _strip_nulls(patch)


def _set_images(doc: dict, images: list[dict]) -> None:
    if doc["kind"] not in _POD_OWNERS:
        return
    pod = doc["spec"]["template"]["spec"]
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name, _, tag = container["image"].partition(":")
        for rule in images:
            if rule["name"] == name:
                container["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}".rstrip(":")


def render(directory: str | Path) -> list[dict]:
    """Render a kustomization directory into its list of resources."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    kust = yaml.safe_load(kfile.read_text())
    unknown = set(kust) - {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
    if unknown:
        raise RenderError(f"{kfile}: unsupported fields {sorted(unknown)}")
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        docs.extend(render(target) if target.is_dir() else _load_docs(target))
    for patch_ref in kust.get("patches", []):
        for patch in _load_docs(directory / patch_ref["path"]):
            docs = _apply_patch(docs, patch, directory / patch_ref["path"])
    for doc in docs:
        _set_images(doc, kust.get("images", []))
        if "namespace" in kust and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = kust["namespace"]
    ids = [resource_id(d) for d in docs]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise RenderError(f"{directory}: duplicate resources {sorted(duplicates)}")
    return docs


def _apply_patch(docs: list[dict], patch: dict, source: Path) -> list[dict]:
    rid = resource_id(patch)
    matches = [i for i, d in enumerate(docs) if resource_id(d) == rid]
    if len(matches) != 1:
        raise RenderError(f"{source}: patch target {rid} matches {len(matches)} resources")
    index = matches[0]
    directive = patch.get("$patch")
    if directive == "delete":
        return docs[:index] + docs[index + 1:]
    if directive is not None:
        raise RenderError(f"{source}: unsupported $patch: {directive}")
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    merged = strategic_merge(copy.deepcopy(docs[index]), body)
    return docs[:index] + [merged] + docs[index + 1:]


def normalise(docs: list[dict]) -> dict[tuple[str, str], Any]:
    """Resources keyed by (kind, name), keyed lists sorted: order-free comparison with kubectl."""
    def norm(value: Any, field: str = "") -> Any:
        if isinstance(value, dict):
            return {k: norm(v, k) for k, v in value.items()}
        if isinstance(value, list):
            items = [norm(v) for v in value]
            key = _merge_key(field, items, [])
            return sorted(items, key=lambda i: str(i.get(key))) if key else items
        return value
    return {resource_id(d): norm(d) for d in docs}
