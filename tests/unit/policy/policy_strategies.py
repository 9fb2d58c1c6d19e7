"""hypothesis strategies for policy manifests, derived from the CRDs' own schemas.

Shared by the policy campaign (``test_policy_fuzz``) and the cluster-document campaign
(``tests/unit/sources/test_document_fuzz``). A manifest is drawn the way a user (or a template)
gets one wrong: mostly the right shape, built from values the validator has to think about
(empty lists, a trailing newline, an address of the other family, a port out of range), then a
few mutations anywhere in the tree (a value of another type, a missing or an unknown key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st

from agent.policy.schema import API_VERSION, POLICY_KINDS, crd_schemas, go_pattern

# Strings a policy field is likely to meet, valid or not for the field at hand.
TRICKY_STRINGS = [
    "",
    "*",
    "a",
    "server",
    "default",
    "Bad_Name",
    "server\n",
    " 80",
    "80",
    "80\n",
    "0",
    "65535",
    "65536",
    "99999",
    "08080",
    "-1",
    "²",
    "10.0.0.1",
    "10.0.0.0/8",
    "10.0.0.1/33",
    "10.0.0.300",
    "::1",
    "fd00::/64",
    "fd00::/129",
    "0.0.0.0/0",
    "cluster.local/ns/default/sa/client",
    "spiffe://cluster.local/ns/default/sa/client",
    "*/sa/client",
    "cluster.local/*",
    "source.ip",
    "remote.ip",
    "destination.ip",
    "destination.port",
    "source.namespace",
    "source.principal",
    "request.headers[x]",
    "250ms",
    "1m30s",
    "0s",
    "1.5.5s",
    "1d",
    "ALLOW",
    "DENY",
    "AUDIT",
    "STRICT",
    "UNSET",
    "true",
    "false",
    "True",
]
strings = st.sampled_from(TRICKY_STRINGS) | st.text(max_size=12)


def mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four: enough wrong values, and enough right ones to go deeper."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else other)


numbers = (
    st.integers(-(2**64), 2**64)
    | st.sampled_from([0, 1, 50, 99, 100, 101, 1_000_000, 1_000_001])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.just(math.nan)
)
# Any value a YAML or JSON document can hold where something else was expected.
junk: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=5,
)


def from_schema(schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """Values of roughly the shape ``schema`` describes (0-3 items a list, any subset of keys)."""
    kind = schema.get("type")
    if "enum" in schema:
        return mostly(st.sampled_from(list(schema["enum"])), strings)
    if "pattern" in schema:
        return mostly(st.from_regex(go_pattern(schema["pattern"])), strings)
    if kind == "object":
        return _object(schema)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=3)
    if kind == "string":
        return strings
    if kind == "integer":
        low, high = schema.get("minimum", -5), schema.get("maximum", 2**63)
        return st.integers(low - 1, high + 1) | st.sampled_from([low, high])
    if kind == "number":
        return numbers
    if kind == "boolean":
        return st.booleans()
    return junk


def _object(schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    props: Mapping[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        return st.dictionaries(strings, from_schema(extra), max_size=3)
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {k: st.deferred(lambda s=sub: from_schema(s)) for k, sub in props.items() if k in required},
        optional={
            k: st.deferred(lambda s=sub: from_schema(s))
            for k, sub in props.items()
            if k not in required and k != "status"
        },
    )


annotations = st.dictionaries(
    mostly(st.sampled_from(["nodemesh.io/dry-run", "istio.io/dry-run", "app"]), strings),
    mostly(st.sampled_from(["true", "false"]), st.sampled_from(["True", "1", ""]) | junk),
    max_size=3,
)
metadata = st.fixed_dictionaries(
    {"name": mostly(st.sampled_from(["p", "q", "allow-client", "a.b"]), strings)},
    optional={
        "namespace": mostly(st.sampled_from(["default", "shop", "nodemesh-system"]), strings),
        "annotations": mostly(annotations, junk),
        "generation": mostly(st.integers(0, 2**63), junk),
        "uid": mostly(st.uuids().map(str), junk),
    },
)


@st.composite
def mutate(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with one node replaced by junk, deleted, or given an unknown key."""
    if isinstance(value, dict) and value and draw(st.sampled_from([True, True, True, False])):
        key = draw(st.sampled_from(sorted(value, key=repr)))
        op = draw(st.sampled_from(["descend", "descend", "replace", "delete", "add"]))
        out = dict(value)
        if op == "descend":
            out[key] = draw(mutate(value[key]))
        elif op == "replace":
            out[key] = draw(junk)
        elif op == "delete":
            del out[key]
        else:
            out[draw(strings | st.integers())] = draw(junk)
        return out
    if isinstance(value, list) and value and draw(st.sampled_from([True, True, True, False])):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(mutate(value[i])), *value[i + 1 :]]
    return draw(junk)


@st.composite
def manifests(draw: st.DrawFn, kinds: tuple[str, ...] = POLICY_KINDS) -> Any:
    """A policy manifest of one of ``kinds``, with 0-2 mutations (most draws have none)."""
    kind = draw(st.sampled_from(kinds))
    spec_schema = crd_schemas()[kind]["properties"]["spec"]
    manifest: Any = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": draw(metadata),
        "spec": draw(from_schema(spec_schema)),
    }
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        key = draw(st.sampled_from(sorted(manifest, key=repr)))
        manifest = {**manifest, key: draw(mutate(manifest[key]))}
    return manifest
