"""What `kubectl get` shows an operator of the nodemesh CRDs, and that README's commands ask
for them in a way that still works in a cluster that also runs Istio.

Istio's CRDs have the same plurals for two kinds (``authorizationpolicies``,
``peerauthentications`` in ``security.istio.io``): kubectl resolves a bare plural to one group
only, so a command naming them bare lists Istio's objects or nodemesh's depending on the
cluster. The category ``nodemesh`` (``kubectl get nodemesh -A``) and the qualified names are
unambiguous.
"""

from __future__ import annotations

import re

from agent.sources.kube import POLICY_PLURALS
from tests.unit.deploy.manifests import REPO, Obj, render

ACCEPTED_PATH = '.status.conditions[?(@.type=="Accepted")].status'
SHARED_WITH_ISTIO = ("authorizationpolicies", "peerauthentications")


def crds() -> dict[str, Obj]:
    return {o["spec"]["names"]["plural"]: o for o in render("daemonset/crds")}


def test_every_kind_the_agent_reports_on_shows_accepted() -> None:
    # The agent writes the Accepted condition on all five kinds (HTTPFault included: an invalid
    # one is refused like the others); each CRD shows it in `kubectl get`.
    by_plural = crds()
    assert set(by_plural) == set(POLICY_PLURALS.values())
    for plural, crd in by_plural.items():
        for version in crd["spec"]["versions"]:
            columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
            assert columns.get("Accepted") == ACCEPTED_PATH, f"{plural} {version['name']}"


def test_every_kind_is_in_the_nodemesh_category() -> None:
    for plural, crd in crds().items():
        assert "nodemesh" in crd["spec"]["names"].get("categories", []), plural


def test_readme_lists_the_policies_without_names_istio_shares() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"kubectl get ([^`\n#]+)", readme)
    assert any(c.split()[0] == "nodemesh" for c in commands), (
        "README never shows kubectl get nodemesh"
    )
    for command in commands:
        for resource in command.split()[0].split(","):
            assert resource not in SHARED_WITH_ISTIO, f"ambiguous with Istio: kubectl get {command}"
