"""How the code sandbox picks its isolation level: `auto` never ends at rlimits, a probe that
only timed out is retried with more time, and a worker on a weaker level re-probes later.

The probe is replaced by a scripted one here (the logic is under test, not the jails; the
real jails are exercised in tests/integration/test_sandbox_*.py)."""

from __future__ import annotations

import pytest

from async_rl.rewards import sandbox, sandbox_levels
from async_rl.rewards.sandbox_levels import Identity, SandboxUnavailable

ME = Identity(None, None, "trainer")


@pytest.fixture
def scripted(monkeypatch):
    """Every tool installed; ``answers[level]`` is the list of probe results still to come
    (None = works); every probe call is recorded as (level, timeout_s)."""
    answers: dict[str, list[str | None]] = {}
    calls: list[tuple[str, float]] = []

    def probe(level, ident, *, timeout_s=None):
        calls.append((level, timeout_s))
        return answers[level].pop(0) if answers.get(level) else None

    monkeypatch.setattr(sandbox, "probe", probe)
    monkeypatch.setattr(sandbox, "sweep_stale_workdirs", lambda: None)
    monkeypatch.setattr(sandbox_levels, "sandbox_identity", lambda user: ME)
    monkeypatch.setattr(sandbox_levels.shutil, "which", lambda tool, **kw: f"/usr/bin/{tool}")
    monkeypatch.setattr(sandbox_levels.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox, "_CHOSEN", {})
    monkeypatch.setattr(sandbox, "_REFUSED", {})
    return answers, calls


def test_auto_refuses_with_one_error_when_no_isolating_level_works(scripted):
    answers, calls = scripted
    for level in sandbox_levels.ISOLATING:
        answers[level] = ["runtime_error: cannot create namespace"]
    with pytest.raises(SandboxUnavailable) as info:
        sandbox.select_isolation("auto", "nobody")
    message = str(info.value)
    assert message.startswith("reward.code.isolation='auto': no isolating sandbox works here")
    assert "set reward.code.isolation=rlimits" in message and "\n" not in message
    assert [level for level, _ in calls] == ["firejail", "bwrap", "unshare"]  # never rlimits


def test_auto_refuses_when_no_jail_is_installed(scripted, monkeypatch):
    monkeypatch.setattr(sandbox_levels.shutil, "which", lambda tool, **kw: None)
    with pytest.raises(SandboxUnavailable, match="works here \\(none installed\\)"):
        sandbox.select_isolation("auto", "nobody")
    assert scripted[1] == []


def test_rlimits_runs_only_when_named(scripted):
    assert sandbox.select_isolation("rlimits", "nobody")[0] == "rlimits"
    assert sandbox_levels.candidates("auto", ME) == ["firejail", "bwrap", "unshare"]


def test_a_probe_that_times_out_under_load_is_retried_with_more_time_before_a_weaker_level(scripted):
    answers, calls = scripted
    answers["firejail"] = ["timeout: host deadline reached", "timeout: host deadline reached"]
    assert sandbox.select_isolation("auto", "nobody")[0] == "firejail"
    assert calls == [("firejail", t) for t in sandbox.PROBE_TIMEOUTS_S]


def test_a_probe_that_fails_for_another_reason_is_not_retried(scripted):
    answers, calls = scripted
    answers["firejail"] = ["runtime_error: firejail: no suid"]
    assert sandbox.select_isolation("auto", "nobody")[0] == "bwrap"
    assert calls == [("firejail", 5.0), ("bwrap", 5.0)]


def test_a_worker_on_a_weaker_level_probes_the_stronger_one_again_later(scripted, monkeypatch):
    answers, calls = scripted
    answers["firejail"] = ["runtime_error: busy"]
    now = [1000.0]
    monkeypatch.setattr(sandbox.time, "monotonic", lambda: now[0])
    assert sandbox.select_isolation("auto", "nobody")[0] == "bwrap"
    now[0] += sandbox.REPROBE_STRONGER_S / 2
    assert sandbox.select_isolation("auto", "nobody")[0] == "bwrap"
    assert len(calls) == 2  # cached in between
    now[0] += sandbox.REPROBE_STRONGER_S
    assert sandbox.select_isolation("auto", "nobody")[0] == "firejail"
    now[0] += 10 * sandbox.REPROBE_STRONGER_S
    assert sandbox.select_isolation("auto", "nobody")[0] == "firejail"
    assert [level for level, _ in calls] == ["firejail", "bwrap", "firejail"]


def test_a_refusal_is_remembered_so_every_program_is_refused_fast_until_the_reprobe(scripted, monkeypatch):
    answers, calls = scripted
    for level in sandbox_levels.ISOLATING:
        answers[level] = ["runtime_error: no namespaces"] * 2
    now = [1000.0]
    monkeypatch.setattr(sandbox.time, "monotonic", lambda: now[0])
    for _ in range(3):
        with pytest.raises(SandboxUnavailable, match="no isolating sandbox works here"):
            sandbox.select_isolation("auto", "nobody")
    assert len(calls) == 3  # one probe per level, then the remembered refusal
    now[0] += sandbox.REPROBE_STRONGER_S
    with pytest.raises(SandboxUnavailable):
        sandbox.select_isolation("auto", "nobody")
    assert len(calls) == 6


def test_concurrent_runs_lease_different_sandbox_users_and_wait_when_all_are_taken(monkeypatch, tmp_path):
    import threading

    members = [Identity(2000 + i, 2000 + i, f"sandbox-{i}") for i in range(2)]
    monkeypatch.setattr(sandbox_levels, "pool", lambda ident: members)
    with sandbox_levels.lease(members[0], tmp_path) as first, sandbox_levels.lease(members[0], tmp_path) as second:
        assert {first.uid, second.uid} == {2000, 2001}
        got, waiter = [], threading.Thread(target=lambda: got.append(_lease_once(members[0], tmp_path)))
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive() and got == []  # every member is leased: the third run waits
    waiter.join(timeout=10)
    assert got and got[0] in {2000, 2001}


def _lease_once(ident, lock_dir):
    with sandbox_levels.lease(ident, lock_dir) as member:
        return member.uid


def test_a_pool_of_one_is_used_without_locks(tmp_path):
    with sandbox_levels.lease(ME, tmp_path / "locks") as member:
        assert member is ME
    assert not (tmp_path / "locks").exists()
