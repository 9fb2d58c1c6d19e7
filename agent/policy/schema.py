"""Validate nodemesh policy manifests against the CRDs' own OpenAPI schemas.

Why: in a cluster the API server validates policies with the CRD schemas before the agent sees
them, but the local-file source (standalone mode and the lab) has no API server. Loading the very
same ``openAPIV3Schema`` from ``agent/policy/crds/`` (the single source of truth, also installed
by ``daemonset/crds/``) means a policy accepted by the file source is one a cluster would accept,
and the two can never drift. The structural subset the CRDs use is interpreted here (type,
properties, required, enum, items, bounds, pattern, additionalProperties, defaults); each CEL rule
(``x-kubernetes-validations``) is re-implemented as a Python check keyed by its exact rule text,
and loading fails loudly if a CRD gains a rule that has no check, so a rule is never skipped.

Unlike the API server (which prunes unknown fields), unknown fields are rejected: in a hand-edited
file they are almost always typos. Defaults from the schema are applied, so consumers read
``spec["action"]`` without guessing. The returned spec is plain ``dict``/``list`` data (it stays
JSON-serialisable for the admin API); readers must not mutate it.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from importlib import resources
from typing import Any

import yaml

from agent.policy import authz
from agent.policy.traffic import config as traffic_config
from agent.state.model import PolicyObject

API_VERSION = "nodemesh.io/v1alpha1"
POLICY_KINDS = (
    "AuthorizationPolicy",
    "PeerAuthentication",
    "TrafficPolicy",
    "RateLimitPolicy",
    "HTTPFault",
)
# What an Istio user's manifest becomes here: the fix named in the error for its API group.
ISTIO_EQUIVALENTS = {
    "security.istio.io": f"nodemesh's AuthorizationPolicy and PeerAuthentication follow Istio's: "
    f"set apiVersion: {API_VERSION}",
    "networking.istio.io": "nodemesh does not read Istio's networking objects: route with a "
    "Gateway API HTTPRoute or GRPCRoute, balance, retry and eject with a TrafficPolicy",
}
# An Istio user's DestinationRule fields, where a TrafficPolicy says the same otherwise: the
# unknown-field error adds the nodemesh spelling (kind, field path in spec without indexes).
_CONSECUTIVE = (
    "use consecutiveFailures: refused or failed connects, resets before any byte and 5xx "
    "answers count alike (Envoy's consecutive 5xx with local-origin failures)"
)
ISTIO_FIELD_HINTS = {
    ("TrafficPolicy", "spec.host"): "name the Service in targetRef (kind: Service, name: NAME)",
    ("TrafficPolicy", "spec.trafficPolicy"): (
        "its fields (loadBalancer, connectionPool, outlierDetection) go directly under spec"
    ),
    ("TrafficPolicy", "spec.subsets"): "weighted subsets are split.subsets",
    ("TrafficPolicy", "spec.loadBalancer.simple"): (
        "use type: PEAK_EWMA (the default), ROUND_ROBIN, LEAST_CONNECTIONS (for LEAST_REQUEST) "
        "or RANDOM"
    ),
    ("TrafficPolicy", "spec.loadBalancer.consistentHash"): (
        "no equivalent per endpoint; split.stickyBySourceIP keeps a client on one subset"
    ),
    ("TrafficPolicy", "spec.loadBalancer.localityLbSetting"): (
        "use localityPreference: SAME_NODE or SAME_ZONE"
    ),
    ("TrafficPolicy", "spec.connectionPool.tcp"): (
        "connectionPool is flat here: maxConnections, connectTimeout, idleTimeout"
    ),
    ("TrafficPolicy", "spec.connectionPool.http"): (
        "connectionPool is flat here: maxPendingRequests (http1MaxPendingRequests), idleTimeout; "
        "retries are spec.retries"
    ),
    ("TrafficPolicy", "spec.outlierDetection.consecutive5xxErrors"): _CONSECUTIVE,
    ("TrafficPolicy", "spec.outlierDetection.consecutiveGatewayErrors"): _CONSECUTIVE,
    ("TrafficPolicy", "spec.outlierDetection.consecutiveErrors"): _CONSECUTIVE,
    ("TrafficPolicy", "spec.outlierDetection.consecutiveLocalOriginFailures"): _CONSECUTIVE,
    ("TrafficPolicy", "spec.outlierDetection.interval"): (
        "no equivalent: an endpoint is ejected at once, at its consecutiveFailures-th failure "
        "in a row, not by a periodic sweep"
    ),
    ("TrafficPolicy", "spec.outlierDetection.minHealthPercent"): (
        "bound ejections with maxEjectionPercent instead"
    ),
}
_INDEX = re.compile(r"\[[0-9]+\]")
DRY_RUN_ANNOTATION = "nodemesh.io/dry-run"
# Istio's spelling of the same switch: a policy written for Istio keeps its meaning here.
ISTIO_DRY_RUN_ANNOTATION = "istio.io/dry-run"
DRY_RUN_ANNOTATIONS = (DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION)

_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # fullmatch: '$' would allow a newline
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda v: isinstance(v, Mapping),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


class PolicyError(ValueError):
    """A policy manifest the schema rejects; ``path`` locates the bad value."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class SchemaError(RuntimeError):
    """A CRD file the validator cannot interpret: a packaging or development error."""


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration such as ``1m30s`` or ``250ms`` (the CRDs' format)."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration; use e.g. 250ms, 5s, 1m30s, 1h")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def _duration_order(obj: Mapping[str, Any]) -> bool:
    if "baseEjectionTime" not in obj or "maxEjectionTime" not in obj:
        return True
    return parse_duration(obj["maxEjectionTime"]) >= parse_duration(obj["baseEjectionTime"])


# CEL rule text (exactly as in the CRDs) -> the equivalent check on the already type-checked value.
CEL_CHECKS: dict[str, Callable[[Any], bool]] = {
    "self.all(b, isCIDR(b) || isIP(b))": lambda v: all(authz.is_ip_or_cidr(b) for b in v),
    "self.all(p, int(p) >= 1 && int(p) <= 65535)": lambda v: all(1 <= int(p) <= 65535 for p in v),
    "has(self.values) || has(self.notValues)": lambda v: "values" in v or "notValues" in v,
    "!has(self.selector) || size(self.selector.matchLabels) > 0": (
        lambda v: "selector" not in v or len(v["selector"]["matchLabels"]) > 0
    ),
    "self.all(k, k.matches('^[0-9]{1,5}$') && int(k) >= 1 && int(k) <= 65535)": (
        lambda v: all(authz.is_port(k) for k in v)
    ),
    "!has(self.portLevelMtls) || has(self.selector)": (
        lambda v: "portLevelMtls" not in v or "selector" in v
    ),
    "!has(self.baseEjectionTime) || !has(self.maxEjectionTime) || "
    "duration(self.maxEjectionTime) >= duration(self.baseEjectionTime)": _duration_order,
    "has(self.delay) || has(self.abort)": lambda v: "delay" in v or "abort" in v,
    "has(self.httpStatus) != has(self.grpcStatus)": (
        lambda v: ("httpStatus" in v) != ("grpcStatus" in v)
    ),
    "self.map(s, s.weight).sum() == 100": lambda v: sum(s["weight"] for s in v) == 100,
    "!has(self.action) || self.action != 'DENY' || (has(self.rules) && size(self.rules) > 0)": (
        lambda v: v.get("action") != "DENY" or len(v.get("rules", ())) > 0
    ),
}


def _walk_rules(schema: Mapping[str, Any], found: list[str]) -> None:
    found.extend(r["rule"] for r in schema.get("x-kubernetes-validations", ()))
    for sub in schema.get("properties", {}).values():
        _walk_rules(sub, found)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), Mapping):
            _walk_rules(schema[key], found)


@functools.cache
def crd_schemas() -> Mapping[str, Mapping[str, Any]]:
    """Each policy kind's v1alpha1 ``openAPIV3Schema``, read from the packaged CRD files."""
    schemas: dict[str, Mapping[str, Any]] = {}
    for entry in resources.files("agent.policy").joinpath("crds").iterdir():
        if not entry.name.endswith(".yaml") or entry.name == "kustomization.yaml":
            continue
        crd = yaml.safe_load(entry.read_text(encoding="utf-8"))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
        schema = version["schema"]["openAPIV3Schema"]
        rules: list[str] = []
        _walk_rules(schema, rules)
        missing = [r for r in rules if r not in CEL_CHECKS]
        if missing:
            raise SchemaError(
                f"{entry.name}: CEL rules without a Python check in agent/policy/schema.py: "
                f"{missing}; add them to CEL_CHECKS"
            )
        schemas[crd["spec"]["names"]["kind"]] = schema
    if set(schemas) != set(POLICY_KINDS):
        raise SchemaError(f"packaged CRDs define {sorted(schemas)}, expected {POLICY_KINDS}")
    return schemas


@functools.cache
def go_pattern(pattern: str) -> re.Pattern[str]:
    """A CRD ``pattern`` with the API server's meaning (Go's RE2, searched, not anchored).

    The one difference that matters between the two dialects: Python's ``$`` also matches just
    before a trailing newline, RE2's only at the end of the text. So every ``$`` outside a
    character class becomes ``\\Z``, and ``'80\\n'`` is refused here as the API server refuses it.
    """
    out: list[str] = []
    escaped = False
    class_start = -1  # index of the '[' of the character class being read, -1 outside one
    for i, char in enumerate(pattern):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif class_start >= 0:
            # a ']' right after '[' or '[^' is a literal member, not the end of the class
            if char == "]" and pattern[class_start + 1 : i] not in ("", "^"):
                class_start = -1
        elif char == "[":
            class_start = i
        elif char == "$":
            char = r"\Z"
        out.append(char)
    return re.compile("".join(out))


def _one_of(choices: Iterable[object]) -> str:
    """``use one of A, B, C``: the choices as a reader types them, not as a Python tuple."""
    return f"use one of {', '.join(str(c) for c in choices)}"


def _unknown_field(key: object, fields: Collection[str]) -> str:
    """The reason of an unknown field, naming the near miss first (``path`` for ``paths``,
    ``method`` for ``methods``): a typo is far likelier than a field from another version.
    Compared case-insensitively, so ``Paths`` also finds ``paths``."""
    names = {f.lower(): f for f in fields}
    close = difflib.get_close_matches(key.lower(), names, n=1) if isinstance(key, str) else []
    hint = f" (did you mean {names[close[0]]}?)" if close else ""
    return f"unknown field{hint}; allowed fields: {', '.join(fields) or 'none'}"


def _check_scalar(value: Any, schema: Mapping[str, Any], path: str) -> None:
    if "enum" in schema and value not in schema["enum"]:
        raise PolicyError(path, f"{value!r} is not allowed; {_one_of(schema['enum'])}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise PolicyError(path, f"must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise PolicyError(path, f"must have at most {schema['maxLength']} characters")
        if "pattern" in schema and go_pattern(schema["pattern"]).search(value) is None:
            raise PolicyError(path, f"{value!r} does not match the pattern {schema['pattern']}")
    elif not isinstance(value, bool | list | Mapping):
        if isinstance(value, float) and not math.isfinite(value):
            # YAML's .nan and .inf: no JSON (so no API server) can carry them, and NaN passes
            # every bound check.
            raise PolicyError(path, f"{value} is not a finite number")
        if "minimum" in schema and value < schema["minimum"]:
            raise PolicyError(path, f"{value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise PolicyError(path, f"{value} is above the maximum {schema['maximum']}")


def _check_object(value: Mapping[str, Any], schema: Mapping[str, Any], path: str) -> dict:
    props: Mapping[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    for key in schema.get("required", ()):
        if key not in value:
            raise PolicyError(f"{path}.{key}", "is required")
    count = len(value)
    if count < schema.get("minProperties", 0):
        raise PolicyError(path, f"needs at least {schema['minProperties']} field(s)")
    if "maxProperties" in schema and count > schema["maxProperties"]:
        raise PolicyError(path, f"allows at most {schema['maxProperties']} fields")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise PolicyError(path, f"key {key!r} must be a string")
        if key in props:
            out[key] = _validate(item, props[key], f"{path}.{key}")
        elif isinstance(extra, Mapping):
            out[key] = _validate(item, extra, f"{path}.{key}")
        else:
            raise PolicyError(f"{path}.{key}", _unknown_field(key, props))
    for key, sub in props.items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
    return out


def _check_array(value: list[Any], schema: Mapping[str, Any], path: str) -> list[Any]:
    if len(value) < schema.get("minItems", 0):
        raise PolicyError(path, f"needs at least {schema['minItems']} item(s)")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise PolicyError(path, f"allows at most {schema['maxItems']} items")
    out = [_validate(v, schema.get("items", {}), f"{path}[{i}]") for i, v in enumerate(value)]
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "set" and len({repr(v) for v in out}) != len(out):
        raise PolicyError(path, "items must be unique")
    if list_type == "map":
        keys = [tuple(v.get(k) for k in schema["x-kubernetes-list-map-keys"]) for v in out]
        if len(set(keys)) != len(keys):
            names = "/".join(schema["x-kubernetes-list-map-keys"])
            raise PolicyError(path, f"items must have unique {names}")
    return out


def _validate(value: Any, schema: Mapping[str, Any], path: str) -> Any:
    kind = schema.get("type")
    if kind is not None and not _TYPES[kind](value):
        raise PolicyError(path, f"expected {kind}, got {type(value).__name__} {value!r}")
    if kind == "object":
        result: Any = _check_object(value, schema, path)
    elif kind == "array":
        result = _check_array(value, schema, path)
    else:
        _check_scalar(value, schema, path)
        result = value
    for rule in schema.get("x-kubernetes-validations", ()):
        if not CEL_CHECKS[rule["rule"]](result):
            raise PolicyError(path, rule["message"])
    return result


def _dry_run(annotations: object, path: str) -> bool:
    """Whether ``nodemesh.io/dry-run`` or Istio's ``istio.io/dry-run`` says "true".

    Both spellings mean the same and take exactly ``"true"`` or ``"false"``: a value the mesh
    would have to guess about (``"yes"``, ``"True"``) is refused rather than read as "enforce",
    and so are the two annotations disagreeing.
    """
    if not isinstance(annotations, Mapping):
        raise PolicyError(
            f"{path}.metadata.annotations",
            f"expected a mapping of names to strings, got {type(annotations).__name__}",
        )
    values: dict[str, str] = {}
    for key in DRY_RUN_ANNOTATIONS:
        if key not in annotations:
            continue
        value = annotations[key]
        if value not in ("true", "false"):
            raise PolicyError(
                f"{path}.metadata.annotations.{key}",
                f"{value!r} is not allowed; use 'true' or 'false'",
            )
        values[key] = value
    if len(set(values.values())) > 1:
        raise PolicyError(
            f"{path}.metadata.annotations",
            f"{DRY_RUN_ANNOTATION} and {ISTIO_DRY_RUN_ANNOTATION} disagree ({values}); "
            "keep one of them",
        )
    return "true" in values.values()


def _metadata(manifest: Mapping[str, Any], path: str) -> tuple[str, str, bool, int, str]:
    meta = manifest.get("metadata")
    if not isinstance(meta, Mapping):
        raise PolicyError(f"{path}.metadata", "is required (an object with name and namespace)")
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
        raise PolicyError(f"{path}.metadata.name", f"{name!r} is not a DNS subdomain name")
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or len(namespace) > 63 or not _NAME.fullmatch(namespace):
        raise PolicyError(f"{path}.metadata.namespace", f"{namespace!r} is not a DNS label")
    dry_run = _dry_run(meta.get("annotations") or {}, path)
    generation = meta.get("generation", 0)
    if not _TYPES["integer"](generation) or generation < 0:
        raise PolicyError(
            f"{path}.metadata.generation", f"{generation!r} is not a non-negative integer"
        )
    return name, namespace, dry_run, generation, str(meta.get("uid", ""))


def _refused(manifest: Mapping[str, Any], key: str) -> str:
    """Why ``manifest[key]`` is refused: absent (not ``None is not allowed``), or its value."""
    return f"{manifest[key]!r} is not allowed" if key in manifest else "is required"


def validate_policy(manifest: Mapping[str, Any], *, path: str) -> PolicyObject:
    """Check one nodemesh.io/v1alpha1 manifest and return it as a ``PolicyObject``.

    ``path`` prefixes every error (for example ``cluster.yaml: policies[2]``) so that the message
    says where the bad value is. ``status`` is ignored: it belongs to whoever reports on it.
    """
    if not isinstance(manifest, Mapping):
        raise PolicyError(path, f"expected a manifest object, got {type(manifest).__name__}")
    if manifest.get("apiVersion") != API_VERSION:
        group = str(manifest.get("apiVersion")).partition("/")[0]
        fix = ISTIO_EQUIVALENTS.get(group, f"use {API_VERSION}")
        raise PolicyError(f"{path}.apiVersion", f"{_refused(manifest, 'apiVersion')}; {fix}")
    kind = manifest.get("kind")
    if kind not in POLICY_KINDS:
        raise PolicyError(f"{path}.kind", f"{_refused(manifest, 'kind')}; {_one_of(POLICY_KINDS)}")
    schema = crd_schemas()[kind]
    unknown = [key for key in manifest if key not in schema["properties"]]
    if unknown:  # the first in the manifest's order: keys need not even be strings
        raise PolicyError(f"{path}.{unknown[0]}", _unknown_field(unknown[0], schema["properties"]))
    name, namespace, dry_run, generation, uid = _metadata(manifest, path)
    if "spec" not in manifest:
        raise PolicyError(f"{path}.spec", "is required")
    try:
        spec = _validate(manifest["spec"], schema["properties"]["spec"], f"{path}.spec")
    except PolicyError as e:
        field = _INDEX.sub("", e.path.removeprefix(f"{path}."))
        hint = ISTIO_FIELD_HINTS.get((kind, field))
        if hint is None:
            raise
        key = field.rpartition(".")[2]
        raise PolicyError(e.path, f"{e.reason}; Istio's DestinationRule {key}: {hint}") from e
    policy = PolicyObject(
        kind=kind,
        namespace=namespace,
        name=name,
        spec=spec,
        generation=generation,
        uid=uid,
        dry_run=dry_run,
    )
    if kind == authz.KIND:
        try:
            authz.check_policy(spec)
        except authz.AuthorizationPolicyError as e:
            raise PolicyError(f"{path}.{e.path}", e.reason) from e
    if kind == traffic_config.KIND:
        # Checks across fields (per-try vs overall timeout, zero durations, duplicate subsets)
        # that the schema cannot express: refused here, the source keeps the previous version.
        try:
            traffic_config.compile_policy(policy)
        except traffic_config.TrafficPolicyError as e:
            raise PolicyError(f"{path}.{e.path}", e.reason) from e
    return policy
