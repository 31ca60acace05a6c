"""Validates custom resources against the `openAPIV3Schema` of their CRDs, stored in
helm/tests/crds/ (sources and versions: crds/SOURCES.md), as a Kubernetes API server with
strict field validation would: unknown fields are refused (the API server prunes them, which
would silently drop a setting), `nullable` and `x-kubernetes-int-or-string` are honoured,
`x-kubernetes-preserve-unknown-fields` keeps an object open, a null where the schema does not
allow one is dropped (the API server prunes it), and labels and annotations must be strings.
Patterns are Go RE2, run here by Python's `re`: an inline `(?i)` is moved to the front."""

import copy
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent / "crds"


def _strict(schema):
    """The CRD schema as JSON Schema: objects with listed properties closed, unless the CRD
    keeps their unknown fields or gives additionalProperties itself."""
    schema = copy.copy(schema)
    if schema.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}] + \
            ([{"type": "null"}] if schema.get("nullable") else [])
    elif schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    pattern = schema.get("pattern")
    if pattern and "(?i)" in pattern and not pattern.startswith("(?i)"):
        schema["pattern"] = "(?i)" + pattern.replace("(?i)", "")
    if "properties" in schema:
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _strict(schema["additionalProperties"])
    if "items" in schema and isinstance(schema["items"], dict):
        schema["items"] = _strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


def _load():
    """(group/version, kind) -> the strict JSON Schema of that CRD version."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                # The CRD's metadata is `type: object`; apiVersion and kind are checked below.
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = \
                    _strict(schema)
    return schemas


SCHEMAS = _load()


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _metadata_problems(resource):
    found = []
    metadata = resource.get("metadata") or {}
    if not isinstance(metadata.get("name"), str) or not metadata["name"]:
        found.append("metadata.name: missing")
    for field in ("labels", "annotations"):
        for k, v in (metadata.get(field) or {}).items():
            if not isinstance(v, str):
                found.append(f"metadata.{field}.{k}: {v!r} is not a string")
    return found


def problems(resource):
    """What is wrong with `resource` against its CRD, as "path: message" lines (none: valid)."""
    key = (resource.get("apiVersion"), resource.get("kind"))
    schema = SCHEMAS.get(key)
    if schema is None:
        return [f"no stored CRD for {key[1]} {key[0]} (helm/tests/crds/)"]
    validator = jsonschema.Draft7Validator(schema)
    pruned = _without_nulls(resource)
    return _metadata_problems(pruned) + [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(pruned), key=lambda e: list(map(str, e.path)))]
