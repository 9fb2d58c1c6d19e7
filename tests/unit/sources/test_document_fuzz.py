"""Fuzzing the cluster document: any text is a document or a ``DocumentError``, never a crash.

Three kinds of input: documents of the right shape built from awkward values and then mutated
(``policy_strategies`` supplies the policies and the mutations), text made of YAML's syntax
characters (anchors, tags, complex keys, flow collections), and a valid document with bytes
flipped, cut or inserted. What parses must also give its state objects and survive a rewrite
(``dump_document``), as ``nodemesh lab annotate/apply`` rewrite the file the agents read.

``make fuzz`` runs these with NODEMESH_FUZZ_EXAMPLES examples; the findings are kept as the
regression tests at the end of the file.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.sources.document import DocumentError, dump_document, parse_document
from tests.fuzzing import fuzz_examples
from tests.unit.policy.policy_strategies import junk, manifests, mostly, mutate, strings


def campaign(default: int) -> settings:
    """``default`` examples in ``make test`` (a second or two each), more in ``make fuzz``."""
    return settings(
        max_examples=fuzz_examples(default),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SOURCE = "cluster.yaml"

names = mostly(st.sampled_from(["n1", "n2", "n3", "client", "server", "default", "shop"]), strings)
ipv4 = mostly(st.sampled_from(["10.244.1.2", "10.244.1.3", "10.96.0.10"]), strings | junk)
labels = st.dictionaries(mostly(st.sampled_from(["app", "nodemesh.io/mesh"]), strings), names)
pod_annotations = st.dictionaries(
    st.sampled_from(
        [
            "nodemesh.io/mesh",
            "nodemesh.io/exclude-outbound-ports",
            "nodemesh.io/exclude-inbound-ports",
        ]
    ),
    st.sampled_from(["enabled", "disabled", "80, 9090", "80,,x", "0", ""]) | strings,
)
pods = st.fixed_dictionaries(
    {"name": names},
    optional={
        "namespace": names,
        "serviceAccount": names,
        "ip": ipv4,
        "labels": labels,
        "annotations": pod_annotations,
    },
)
nodes = st.fixed_dictionaries(
    {"name": names},
    optional={
        "ip": ipv4,
        "podCIDR": mostly(st.just("10.244.1.0/24"), strings),
        "pods": st.lists(pods, max_size=3),
    },
)
ports = st.fixed_dictionaries(
    {"port": mostly(st.sampled_from([80, 443]), junk)},
    optional={
        "targetPort": mostly(st.sampled_from([8080, 80]), junk),
        "name": names,
        "protocol": st.sampled_from(["TCP", "UDP"]),
    },
)
services = st.fixed_dictionaries(
    {"name": names, "ports": st.lists(ports, max_size=2)},
    optional={"namespace": names, "selector": labels, "clusterIP": ipv4},
)
documents = st.fixed_dictionaries(
    {"nodes": st.lists(nodes, min_size=1, max_size=3)},
    optional={
        "trustDomain": mostly(st.just("example.org"), strings),
        "namespaces": st.lists(st.fixed_dictionaries({"name": names}, optional={"labels": labels})),
        "services": st.lists(services, max_size=2),
        "policies": st.lists(manifests(), max_size=2),
    },
)
YAML_SYNTAX = [
    *"{}[]:,-?&*!|>'\"#%@` \n\t",
    *("a", "b", "1", ".", "nodes", "name", "<<", "&a ", "*a", "!!", "!!int ", "!!float "),
    *("!!bool ", "!!timestamp ", "!!map ", "!!set ", "!!omap ", "!!pairs ", "!!binary "),
    *("2001-13-45", "12:30:45", "2001-12-14t21:59:43.10-25:00", "0x1F", ".nan", "~"),
]

VALID = """\
trustDomain: example.org
nodes:
  - name: node1
    pods:
      - {name: client, serviceAccount: client, ip: 10.244.1.2, labels: {app: client}}
services:
  - {name: server, selector: {app: server}, ports: [{port: 80, targetPort: 8080}]}
policies:
  - apiVersion: nodemesh.io/v1alpha1
    kind: AuthorizationPolicy
    metadata: {name: p, annotations: {istio.io/dry-run: "true"}}
    spec: {rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {ports: ["80"]}}]}]}
"""


def check(text: str) -> None:
    """The property: a clean ``DocumentError`` naming the file, or a document that gives its
    state and reads back equal after a rewrite."""
    try:
        doc = parse_document(text, source=SOURCE)
    except DocumentError as e:
        assert str(e).startswith(SOURCE)
        assert e.problem
        return
    doc.to_state()
    assert parse_document(dump_document(doc), source=SOURCE) == doc


@pytest.mark.fuzz
@campaign(50)
@given(st.data())
def test_documents_of_the_right_shape(data: st.DataObject) -> None:
    doc: Any = data.draw(documents)
    if data.draw(st.sampled_from([False, False, False, True])):
        doc = data.draw(mutate(doc))
    check(yaml.safe_dump(doc, allow_unicode=data.draw(st.booleans())))


@pytest.mark.fuzz
@campaign(30)
@given(st.lists(manifests(), min_size=1, max_size=3))
def test_a_valid_document_with_drawn_policies(policies: list[Any]) -> None:
    doc = yaml.safe_load(VALID)
    doc["policies"] = policies
    check(yaml.safe_dump(doc))


@pytest.mark.fuzz
@campaign(100)
@given(st.lists(st.sampled_from(YAML_SYNTAX), max_size=40).map("".join))
def test_yaml_syntax_soup(text: str) -> None:
    check(text)


@pytest.mark.fuzz
@campaign(100)
@given(st.data())
def test_a_valid_document_with_bytes_flipped_cut_or_inserted(data: st.DataObject) -> None:
    text = VALID
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and pos < len(text):
            text = text[:pos] + data.draw(st.characters()) + text[pos + 1 :]
        elif op == "cut":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 16)) :]
        else:
            text = text[:pos] + data.draw(st.sampled_from(YAML_SYNTAX) | strings) + text[pos:]
    check(text)


def test_the_valid_document_is_valid() -> None:
    """The mutation campaign starts from a document that parses (else it tests nothing)."""
    (policy,) = parse_document(VALID, source=SOURCE).policies
    assert policy.dry_run


# Findings of the campaigns, each with the exact input: a clean DocumentError now. Before, each
# escaped ``parse_document`` as another exception (the agent's file source and the lab expect
# DocumentError only).
FINDINGS: list[tuple[str, str]] = [
    # TypeError from the duplicate-key check: a flow mapping as a key (a cut in VALID)
    (VALID[:448] + VALID[458:], "found unhashable key"),
    ("? [a]\n: 1\n", "found unhashable key"),
    # RecursionError in PyYAML's composer
    ("[" * 5000, "nested deeper than 64 levels"),
    # ValueError from PyYAML's scalar constructors
    ("nodes: [{name: 2001-13-45}]", "month must be in 1..12"),
    ("nodes: [{name: 2001-12-14t21:59:43.10-25:00}]", "a value cannot be read"),
    ("nodes: !!int abc", "a value cannot be read"),
    ("nodes: !!float x", "a value cannot be read"),
    # the same, as IndexError, KeyError, AttributeError and TypeError
    ("!!int ", "IndexError"),
    ("nodes: !!bool x", "KeyError"),
    ("nodes: !!timestamp x", "AttributeError"),
    ("nodes: !!map [[a]]", "TypeError"),
    # AttributeError / ValueError from the policy metadata (before the policy campaign's fixes)
    (
        "nodes: [{name: n1}]\npolicies: [{apiVersion: nodemesh.io/v1alpha1, kind: "
        "PeerAuthentication, metadata: {name: p, annotations: [a]}, spec: {}}]",
        "expected a mapping of names to strings",
    ),
    (
        "nodes: [{name: n1}]\npolicies: [{apiVersion: nodemesh.io/v1alpha1, kind: "
        "PeerAuthentication, metadata: {name: p, generation: x}, spec: {}}]",
        "'x' is not a non-negative integer",
    ),
]


@pytest.mark.parametrize(("text", "problem"), FINDINGS, ids=[p for _, p in FINDINGS])
def test_fuzz_findings_are_clean_rejections(text: str, problem: str) -> None:
    with pytest.raises(DocumentError) as info:
        parse_document(text, source=SOURCE)
    assert problem in info.value.problem
