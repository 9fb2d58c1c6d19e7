"""Preflight logic: a missing requirement gives a FAIL row with the observation and the fix."""

from __future__ import annotations

import argparse
import json
import resource

import pytest

from agent import preflight
from agent import preflight_probes as probes


def _missing(message: str) -> probes.Unsupported:
    return probes.Unsupported(message)


def _fail_with(message: str) -> object:
    def probe() -> str:
        raise _missing(message)

    return probe


def test_simulated_missing_sockmap_names_observation_and_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probes, "sockmap", _fail_with("bpf(BPF_MAP_CREATE) failed: EINVAL"))
    reqs = [r for r in preflight.requirements() if r.name == "sockmap"]
    (row,) = preflight.run_checks(reqs)
    assert not row.ok
    assert row.detail == "bpf(BPF_MAP_CREATE) failed: EINVAL"
    assert "CONFIG_BPF_STREAM_PARSER=y" in row.fix
    text = preflight.format_text([row])
    assert text.splitlines()[0].startswith("FAIL  sockmap")
    assert "fix: the kernel needs CONFIG_BPF_STREAM_PARSER=y" in text.splitlines()[1]
    assert text.splitlines()[-1] == "1 of 1 requirements not met"


def test_one_failure_does_not_hide_the_others() -> None:
    reqs = [
        preflight.Requirement("a", "first", lambda: "fine", "fix a"),
        preflight.Requirement("b", "second", preflight._wrap(_fail_with("absent")), "fix b"),  # type: ignore[arg-type]
        preflight.Requirement("c", "third", lambda: "fine too", "fix c"),
    ]
    rows = preflight.run_checks(reqs)
    assert [(r.name, r.ok, r.fix) for r in rows] == [
        ("a", True, ""),
        ("b", False, "fix b"),
        ("c", True, ""),
    ]
    doc = json.loads(preflight.format_json(rows))
    assert doc["ok"] is False
    assert doc["checks"][1] == {
        "name": "b",
        "title": "second",
        "ok": False,
        "detail": "absent",
        "fix": "fix b",
    }


def test_exit_code_is_zero_only_when_all_pass(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = (preflight.Requirement("a", "first", lambda: "fine", "fix a"),)
    monkeypatch.setattr(preflight, "requirements", lambda: ok)
    assert preflight._command(argparse.Namespace(json=False)) == 0
    assert capsys.readouterr().out.endswith("all requirements met\n")
    bad = (*ok, preflight.Requirement("b", "second", preflight._wrap(_fail_with("x")), "f"))  # type: ignore[arg-type]
    monkeypatch.setattr(preflight, "requirements", lambda: bad)
    assert preflight._command(argparse.Namespace(json=True)) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_privileges_without_root_needs_three_capabilities() -> None:
    all_caps = 1 << probes.CAP_BPF | 1 << probes.CAP_NET_ADMIN | 1 << probes.CAP_SYS_ADMIN
    assert "are effective" in probes.privileges(euid=1000, cap_eff=all_caps)
    with pytest.raises(probes.Unsupported, match=r"not root \(uid 1000\) and missing CAP_BPF$"):
        probes.privileges(euid=1000, cap_eff=all_caps & ~(1 << probes.CAP_BPF))
    with pytest.raises(probes.Unsupported, match="CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"):
        probes.privileges(euid=1000, cap_eff=0)
    full = all_caps | 1 << 24  # CAP_SYS_RESOURCE and the rest of a root shell's set
    assert probes.privileges(euid=0, cap_eff=full) == "running as root"


# The agent pod of daemonset/agent.yaml: root, with BPF, NET_ADMIN and SYS_RESOURCE only.
AGENT_POD_CAPS = 1 << probes.CAP_BPF | 1 << probes.CAP_NET_ADMIN | 1 << 24


def test_root_without_the_agents_capabilities_is_not_enough() -> None:
    # Root in a container whose capabilities were dropped cannot run the agent: "running as
    # root" would send the operator after the kernel's configuration instead.
    with pytest.raises(probes.Unsupported, match=r"root \(uid 0\) but missing CAP_BPF, CAP_NET_"):
        probes.privileges(euid=0, cap_eff=1 << 24)


def test_the_agents_pod_passes_and_is_told_what_check_cannot_probe_there() -> None:
    detail = probes.privileges(euid=0, cap_eff=AGENT_POD_CAPS)
    assert detail.startswith("running as root without CAP_SYS_ADMIN")
    assert "the agent does not need it" in detail


def test_a_refused_scratch_namespace_is_not_blamed_on_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `kubectl exec` into the agent pod: no CAP_SYS_ADMIN, so the clsact probe cannot make its
    # scratch network namespace. Not a kernel without clsact: the row says so, and where to run.
    from pyroute2 import netns

    def refused(name: str) -> None:
        raise OSError(1, "mount rundir failed")

    monkeypatch.setattr(probes, "_tc_program", lambda: (None, None))
    monkeypatch.setattr(netns, "create", refused)
    (row,) = preflight.run_checks(
        [r for r in preflight.requirements() if r.name == "clsact-cls-bpf"]
    )
    assert not row.ok
    assert "not probed" in row.detail and "CAP_SYS_ADMIN" in row.detail
    assert "CONFIG_NET_SCH_INGRESS" not in row.fix
    assert "on the node as root" in row.fix


def test_every_requirement_has_a_fix_and_a_unique_name() -> None:
    reqs = preflight.requirements()
    assert len({r.name for r in reqs}) == len(reqs)
    assert all(r.fix and r.title for r in reqs)


def test_a_kernel_without_the_splice_passes_and_says_same_node_is_relayed_in_user_space(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("bcc")
    monkeypatch.setattr(probes, "_SPLICE_PROGRAM", "int probe_splice(void) { return undefined; }")
    (row,) = preflight.run_checks([r for r in preflight.requirements() if r.name == "splice"])
    assert row.ok
    assert row.detail.startswith("unavailable (optional): compiling the probe failed")
    assert row.detail.endswith(
        "same-node connections are relayed in user space "
        "(needs CONFIG_BPF_STREAM_PARSER and Linux >= 5.8)"
    )


def test_without_privileges_a_refused_probe_says_to_run_as_root_before_kernel_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run as a user, the sockmap probe gets EPERM: its fix must not send the user after
    CONFIG_BPF_STREAM_PARSER first. A failure of another kind keeps its own fix, and as root
    (privileges ok) an EPERM (lockdown, seccomp) keeps the kernel's fix."""
    monkeypatch.setattr(probes, "privileges", _fail_with("not root (uid 1000)"))
    monkeypatch.setattr(probes, "sockmap", _fail_with("bpf(BPF_MAP_CREATE) failed: EPERM"))
    monkeypatch.setattr(probes, "bpffs", _fail_with("/sys/fs/bpf is not a bpf filesystem"))
    names = ("privileges", "bpffs", "sockmap")
    reqs = [r for r in preflight.requirements() if r.name in names]
    fixes = {r.name: r.fix for r in preflight.run_checks(reqs)}
    sockmap = next(r.fix for r in reqs if r.name == "sockmap")
    assert fixes["sockmap"] == preflight.UNPRIVILEGED_FIX + sockmap
    assert fixes["bpffs"] == next(r.fix for r in reqs if r.name == "bpffs")
    monkeypatch.setattr(probes, "privileges", lambda: "running as root")
    reqs = [r for r in preflight.requirements() if r.name in names]
    assert {r.name: r.fix for r in preflight.run_checks(reqs)}["sockmap"] == sockmap


def test_what_bcc_prints_goes_into_the_row_it_explains_not_before_the_report(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The compiler writes its errors to file descriptor 2 itself: they must not precede the
    report, and the failing row quotes them."""
    pytest.importorskip("bcc")
    monkeypatch.setattr(probes, "_TC_PROGRAM", "int probe_assign(void) { return undefined_x; }")
    probes._tc_program.cache_clear()
    try:
        (row,) = preflight.run_checks(
            [r for r in preflight.requirements() if r.name == "sk-assign"]
        )
    finally:
        probes._tc_program.cache_clear()
    assert capfd.readouterr().err == ""
    assert not row.ok
    assert row.detail.startswith("loading a tc program calling bpf_sk_assign failed: ")
    assert "undefined_x" in row.detail  # clang's "use of undeclared identifier 'undefined_x'"


def test_a_process_that_cannot_splice_passes_and_says_relays_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.proxy import splicepipe

    monkeypatch.setattr(splicepipe, "splice", None)
    (row,) = preflight.run_checks([r for r in preflight.requirements() if r.name == "relay-splice"])
    assert row.ok
    assert row.detail.startswith("unavailable (optional; [Errno 38] os.splice needs Python")
    assert row.detail.endswith("relays copy through user space")


@pytest.mark.parametrize(
    ("limits", "ok", "detail"),
    [
        # a container runtime's usual soft 1,024 under a high hard limit: fine, the agent raises it
        ((1024, 1 << 20), True, "soft 1,024, hard 1,048,576: each proxy process admits up to "
         "458,240 connections at once"),
        ((65536, 65536), True, "hard 65,536: each proxy process admits up to 28,160"),
        ((1024, resource.RLIM_INFINITY), True, "hard unlimited: each proxy process admits up "
         "to 458,240"),
        # a hard limit of 1,024 leaves 256 connections per process: a node's pods would be refused
        ((1024, 1024), False, "soft 1,024, hard 1,024: each proxy process admits up to 256 "
         "connections at once (nodemesh agent --max-connections auto), fewer than 1,024"),
    ],
)  # fmt: skip
def test_the_open_files_row_tells_the_connections_each_process_admits_under_the_hard_limit(
    monkeypatch: pytest.MonkeyPatch, limits: tuple[int, int], ok: bool, detail: str
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits)
    (row,) = preflight.run_checks([r for r in preflight.requirements() if r.name == "open-files"])
    assert row.ok is ok
    assert detail in row.detail
    assert bool(row.fix) is not ok and ("LimitNOFILE=" in row.fix or ok)
