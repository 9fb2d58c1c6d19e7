"""The security-relevant facts of the install, asserted on the rendered manifests.

Each test states one promise made in daemonset/*.yaml or README ("Install on a cluster") so that a
later edit cannot widen a permission or expose a port without a test saying so.
"""

from __future__ import annotations

import re
import tomllib
from urllib.parse import urlsplit

from tests.unit.deploy.manifests import (
    REPO,
    Obj,
    containers,
    find,
    flags,
    pod_spec,
    render,
    repeated_flag,
)

ADMIN_PORT = 15000
BUILTIN_ROLES = {"cluster-admin", "admin", "edit"}
# (apiGroup, resource, verb) the agent may use: the calls of agent/sources/kube.py.
AGENT_PERMISSIONS = (
    {("", r, v) for r in ("pods", "namespaces", "services") for v in ("list", "watch")}
    | {("discovery.k8s.io", "endpointslices", v) for v in ("list", "watch")}
    | {
        ("nodemesh.io", f"{r}{sub}", v)
        for r in (
            "authorizationpolicies",
            "peerauthentications",
            "trafficpolicies",
            "ratelimitpolicies",
            "httpfaults",
        )
        for sub, verbs in (("", ("list", "watch")), ("/status", ("patch",)))
        for v in verbs
    }
    | {
        ("gateway.networking.k8s.io", f"{r}{sub}", v)
        for r in ("httproutes", "grpcroutes")
        for sub, verbs in (("", ("list", "watch")), ("/status", ("patch",)))
        for v in verbs
    }
    | {("", "events", "create")}
)
CA_CLUSTER_PERMISSIONS = {
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("", "pods", "get"),
    ("", "pods", "list"),
}
AGENT_CAPABILITIES = {"BPF", "NET_ADMIN", "SYS_RESOURCE"}
AGENT_HOST_PATHS = {  # host path -> read-only in the container
    "/sys/fs/bpf": False,
    "/lib/modules": True,
    "/usr/src": True,
}


def base() -> list[Obj]:
    return render("daemonset")


def agent() -> Obj:
    return find(base(), "DaemonSet", "nodemesh-agent")


def agent_container() -> Obj:
    container: Obj = pod_spec(agent())["containers"][0]
    return container


def ca_container() -> Obj:
    container: Obj = pod_spec(find(base(), "Deployment", "nodemesh-ca"))["containers"][0]
    return container


def permissions(role: Obj) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


def test_rbac_has_no_wildcards_and_no_builtin_admin_roles() -> None:
    for obj in base():
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj["rules"]:
                for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert "*" not in rule.get(field, []), (
                        f"{obj['kind']}/{obj['metadata']['name']}"
                    )
                assert "nonResourceURLs" not in rule
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            role = obj["roleRef"]["name"]
            assert role not in BUILTIN_ROLES and not role.startswith("system:"), role


def test_agent_permissions_are_exactly_the_documented_ones() -> None:
    assert permissions(find(base(), "ClusterRole", "nodemesh-agent")) == AGENT_PERMISSIONS
    bound = [
        o
        for o in base()
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["name"] == "nodemesh-agent" for s in o["subjects"])
    ]
    assert sorted((b["kind"], b["roleRef"]["name"]) for b in bound) == [
        ("ClusterRoleBinding", "nodemesh-agent"),
        ("RoleBinding", "nodemesh-agent"),
    ]
    # In its own namespace: only the route-status Lease (agent/sources/lease.py), by name.
    role = find(base(), "Role", "nodemesh-agent")
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
        if rule["verbs"] == ["create"]:
            continue  # Kubernetes cannot limit create by name: the object does not exist yet.
        assert rule["resourceNames"] == ["nodemesh-route-status"]
        assert set(rule["verbs"]) <= {"get", "update"}


def test_ca_touches_only_its_own_secret_and_configmap() -> None:
    assert permissions(find(base(), "ClusterRole", "nodemesh-ca")) == CA_CLUSTER_PERMISSIONS
    role = find(base(), "Role", "nodemesh-ca")
    secret_ns, _, secret_name = flags(ca_container())["--root-secret"].partition("/")
    assert secret_ns == role["metadata"]["namespace"]
    configmap_ns, _, configmap_name = flags(ca_container())["--root-configmap"].partition("/")
    assert configmap_ns == secret_ns
    mounted = next(v for v in pod_spec(agent())["volumes"] if "configMap" in v)
    assert mounted["configMap"]["name"] == configmap_name
    mount = next(m for m in agent_container()["volumeMounts"] if m["name"] == mounted["name"])
    assert flags(agent_container())["--ca-root"] == f"{mount['mountPath']}/root.pem"
    allowed_names = {"secrets": secret_name, "configmaps": configmap_name}
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""] and set(rule["resources"]) <= set(allowed_names)
        if rule["verbs"] == ["create"]:
            continue  # Kubernetes cannot limit create by name: the object does not exist yet.
        assert "resourceNames" in rule, f"unnamed {rule['verbs']} on {rule['resources']}"
        for resource in rule["resources"]:
            assert rule["resourceNames"] == [allowed_names[resource]]
        assert set(rule["verbs"]) <= {"get", "update"}


def test_admin_port_is_loopback_only_and_never_published() -> None:
    admin = urlsplit("//" + flags(agent_container())["--admin-address"])
    assert admin.hostname == "127.0.0.1" and admin.port == ADMIN_PORT
    for obj, container in containers(base()):
        assert ADMIN_PORT not in [p["containerPort"] for p in container.get("ports", [])], obj
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            handler = container.get(probe, {})
            port = (handler.get("httpGet") or handler.get("tcpSocket") or {}).get("port")
            assert port != ADMIN_PORT
    for svc in (o for o in base() if o["kind"] == "Service"):
        assert ADMIN_PORT not in [p["port"] for p in svc["spec"]["ports"]]
        assert ADMIN_PORT not in [p.get("targetPort") for p in svc["spec"]["ports"]]


def test_agent_capabilities_are_the_documented_minimum() -> None:
    context = agent_container()["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert set(context["capabilities"]["add"]) == AGENT_CAPABILITIES
    assert not context.get("privileged", False)
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    # Each added capability is explained in the manifest's header.
    header = (REPO / "daemonset/agent.yaml").read_text().split("\napiVersion:")[0]
    documented = set(re.findall(r"^#   ([A-Z_]+) ", header, flags=re.MULTILINE))
    assert documented == AGENT_CAPABILITIES
    # The pod's init container (kernel headers check) gets none of them.
    for init in pod_spec(agent())["initContainers"]:
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert init["securityContext"]["runAsNonRoot"] is True
        assert all(m.get("readOnly") for m in init["volumeMounts"])


def test_every_other_container_runs_unprivileged() -> None:
    for objs in (base(), render("daemonset/samples")):
        for obj, container in containers(objs):
            if obj["metadata"]["name"] == "nodemesh-agent":
                continue
            pod = pod_spec(obj).get("securityContext", {})
            context = container["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, obj["metadata"]
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert not pod_spec(obj).get("hostNetwork", False)


def test_agent_host_mounts_are_the_documented_ones() -> None:
    spec = pod_spec(agent())
    host_volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(host_volumes.values()) == set(AGENT_HOST_PATHS)
    for mount in agent_container()["volumeMounts"]:
        if mount["name"] in host_volumes:
            path = host_volumes[mount["name"]]
            assert mount["mountPath"] == path
            assert mount.get("readOnly", False) is AGENT_HOST_PATHS[path], path
            assert mount.get("mountPropagation", "None") in ("None", "HostToContainer")


def test_images_are_pinned_to_the_package_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for objs in (base(), render("daemonset/samples")):
        for _, container in containers(objs):
            image = container["image"]
            assert image == f"nodemesh/nodemesh:{version}", image
            assert container["imagePullPolicy"] == "IfNotPresent"


def test_ca_token_is_bound_to_the_ca_audience() -> None:
    projected = [
        s["serviceAccountToken"]
        for v in pod_spec(agent())["volumes"]
        for s in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in s
    ]
    assert len(projected) == 1
    token = projected[0]
    assert token["audience"] in repeated_flag(ca_container(), "--token-audience")
    assert token["audience"] not in ("", "https://kubernetes.default.svc")
    assert token["expirationSeconds"] <= 3600
    mount = next(m for m in agent_container()["volumeMounts"] if m["name"] == "ca-token")
    assert flags(agent_container())["--token-file"] == f"{mount['mountPath']}/{token['path']}"
    namespace = agent()["metadata"]["namespace"]
    account = pod_spec(agent())["serviceAccountName"]
    assert f"{namespace}/{account}" in repeated_flag(ca_container(), "--trusted-agent")


def test_agent_reaches_the_ca_by_a_name_in_its_certificate() -> None:
    address = urlsplit("//" + flags(agent_container())["--ca-address"])
    host, namespace, *_ = address.hostname.split(".")  # type: ignore[union-attr]
    service = find(base(), "Service", host)
    assert service["metadata"]["namespace"] == namespace
    assert address.port in [p["port"] for p in service["spec"]["ports"]]
    assert address.hostname in repeated_flag(ca_container(), "--san")
    assert pod_spec(agent())["dnsPolicy"] == "ClusterFirstWithHostNet"


RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def test_samples_meet_pod_security_restricted() -> None:
    # The demo namespace enforces "restricted": meshed workloads need nothing from the mesh.
    objs = render("daemonset/samples")
    labels = find(objs, "Namespace", "nodemesh-demo")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj, container in containers(objs):
        spec = pod_spec(obj)
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host, False)
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, volume
        context = container["securityContext"]
        pod = spec["securityContext"]
        assert not context.get("privileged", False)
        assert set(context["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context.get("runAsNonRoot", pod.get("runAsNonRoot")) is True
        seccomp = context.get("seccompProfile", pod.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost")
        assert all("hostPort" not in p for p in container.get("ports", []))


def test_workload_selectors_match_their_pod_templates() -> None:
    # The API server rejects a workload whose selector does not match its template; the schemas
    # alone do not say so.
    for objs in (base(), render("daemonset/samples")):
        for obj in objs:
            if obj["kind"] in ("Deployment", "DaemonSet"):
                template = obj["spec"]["template"]["metadata"]["labels"]
                selector = obj["spec"]["selector"]["matchLabels"]
                assert selector.items() <= template.items(), obj["metadata"]["name"]
