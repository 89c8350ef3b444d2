"""Suite-wide rule: a run that executes no test fails.

pytest already fails a run that collects nothing (status 5), but a run whose every test skipped
(no root, no redis-server...) exits 0 as if it had checked something. Such a run gets status 5
too, with a line saying why."""
from __future__ import annotations

import pytest

_ran = {"passed": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        _ran["passed"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.OK and _ran["passed"] == 0 and session.testscollected:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:  # type: ignore[no-untyped-def]
    stats = terminalreporter.stats
    if _ran["passed"] == 0 and stats.get("skipped") and not stats.get("failed") and not stats.get("error"):
        terminalreporter.write_line("no test ran (every one was skipped or deselected): this run checked nothing "
                                    "and fails; see the skip reasons above (`-rs`)", red=True)
