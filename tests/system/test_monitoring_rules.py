"""deploy/prometheus/tunnel-rules.yaml passes Prometheus's own checks: `promtool check
rules` (syntax, PromQL, templates) and `promtool test rules` with tunnel-rules.test.yaml
(each alert fires on its series, and none for a healthy daemon). promtool comes with
Debian's `prometheus` package (installed by .ci/run)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.system.services import require_tool

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_check_rules_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", "tunnel-rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = promtool("test", "rules", "tunnel-rules.test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
