"""The deployment files pass the tools their formats have: hadolint, the Compose specification's schema,
the Kubernetes API schemas, yamllint, and promtool (config, rules, and the rules' unit tests)."""

from __future__ import annotations

import pytest

from tests.deploy.tools import (COMPOSE, COMPOSE_OVERRIDES, DOCKERFILE, K8S_MANIFESTS, PROMETHEUS_DIR, YAMLLINT_CONFIG,
                    run, tool)

pytestmark = pytest.mark.timeout(300)


def test_dockerfile_passes_hadolint():
    proc = run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_has_the_three_targets_non_root_and_healthchecks():
    from tests.deploy.tools import dockerfile_stages

    text = DOCKERFILE.read_text()
    stages = dockerfile_stages(text)
    assert {"gateway", "engine-cpu", "engine-gpu"} <= set(stages)
    for name in ("gateway", "engine-cpu", "engine-gpu"):
        assert stages[name]["healthcheck"] and "/health" in stages[name]["healthcheck"], name
    # Each final stage switches to the unprivileged uid before its entrypoint.
    for block in text.split("\nFROM ")[1:]:
        if block.split()[2] in ("gateway", "engine-cpu", "engine-gpu"):
            assert "\nUSER 10001:10001\n" in block, block.splitlines()[0]
    # The GPU engine pins vllm through the gpu extra; the CPU one through the cpu extra; the gateway has no torch.
    for extra in ("gpu", "cpu", "gateway"):
        assert f"pyproject_deps.py --build {extra} " in text, extra
    # The project itself installs offline from the dependency layer (build backend included there), and no
    # build step needs a registry for its Dockerfile frontend.
    assert text.count("pip install --no-deps --no-build-isolation .") == 3
    assert "# syntax=" not in text
    # Dependencies are installed before the source is copied, in every build stage.
    for block in text.split("\nFROM ")[1:]:
        if "COPY server" in block:
            assert block.index("requirements.txt") < block.index("COPY server"), block.splitlines()[0]


@pytest.mark.parametrize("path", [COMPOSE, *COMPOSE_OVERRIDES], ids=lambda p: p.name)
def test_compose_file_validates_against_compose_spec(path):
    proc = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_manifests_validate_against_api_schemas():
    assert K8S_MANIFESTS, "no manifests in deploy/k8s"
    proc = run([tool("kubernetes-validate"), "--strict", *map(str, K8S_MANIFESTS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout + proc.stderr


def test_yaml_files_pass_yamllint():
    proc = run([tool("yamllint"), "--strict", "-c", str(YAMLLINT_CONFIG), str(COMPOSE), "deploy"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_accepts_the_compose_config_and_rules():
    proc = run([tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 1 rule files found" in proc.stdout + proc.stderr


def test_promtool_accepts_the_kubernetes_config():
    proc = run([tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus-k8s.yml")])
    out = proc.stdout + proc.stderr
    if "field kubernetes_sd_configs not found" in out:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's package strips it); "
                    "upstream promtool (prom/prometheus image or GitHub release) checks this file")
    assert proc.returncode == 0, out


def test_promtool_accepts_the_alert_rules():
    proc = run([tool("promtool"), "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout + proc.stderr


def test_alert_rules_fire_as_their_unit_tests_say():
    """Engine down after 1 min, error rate above 5%, p99 TTFT above 2 s, an adapter's quality drift for 15 min:
    each fires, and not before."""
    proc = run([tool("promtool"), "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_cover_engine_down_error_rate_and_ttft():
    import yaml

    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert 'up{job="flylora-engine"} == 0' in exprs["FlyLoRAEngineDown"]
    assert "flylora_gateway_requests_total" in exprs["FlyLoRAHighErrorRate"]
    assert "histogram_quantile(0.99" in exprs["FlyLoRAHighTTFTp99"]
    assert "flylora_adapter_quality_drift" in exprs["FlyLoRAAdapterQualityDrift"]
