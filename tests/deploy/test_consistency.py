"""Names, ports and environment variables in the Dockerfile, docker-compose.yml and the Kubernetes manifests
agree with the settings the code actually reads (server.settings.Settings, flylora_runtime.engine.launcher.EngineConfig)
and with each other: the gateway reaches the engine on the engine's port, both see the same adapter store and
base model, Prometheus scrapes the ports the processes listen on."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from flylora_runtime.engine.launcher import DTYPES, EngineConfig
from server.settings import Settings

from tests.deploy.tools import (COMPOSE, COMPOSE_OVERRIDES, DOCKERFILE, K8S_MANIFESTS, PROMETHEUS_DIR, REPO,
                    compose_interpolate, dockerfile_stages, k8s_objects)

ENV_NAME = re.compile(r"FLYLORA_[A-Z0-9_]+")
#: How the code reads an environment variable: os.environ.get("X"), os.environ["X"], os.getenv("X"), _env("X").
ENV_READ = re.compile(r"""(?:environ\.get|environ\[|getenv|_env)\(?\s*["'](FLYLORA_[A-Z0-9_]+)["']""")


def settings_env_names() -> set[str]:
    prefix = Settings.model_config["env_prefix"]
    return {prefix + name.upper() for name in Settings.model_fields}


def code_env_names() -> set[str]:
    """Every FLYLORA_* variable read directly by the code (engine, paths, plugin, kernels, gateway CLI)."""
    found: set[str] = set()
    for package in ("flylora_runtime", "server"):
        for path in (REPO / package).rglob("*.py"):
            found |= set(ENV_READ.findall(path.read_text()))
    return found


REAL_ENV = settings_env_names() | code_env_names()


def deploy_files() -> list[Path]:
    return [DOCKERFILE, COMPOSE, *COMPOSE_OVERRIDES, *K8S_MANIFESTS, *sorted(PROMETHEUS_DIR.glob("*.yml"))]


@pytest.fixture
def only_env(monkeypatch):
    """Replace every FLYLORA_* variable of this process by the given ones (what a container would see)."""

    def apply(env: dict[str, str]) -> None:
        for key in list(os.environ):
            if key.startswith("FLYLORA_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))

    return apply


def gateway_settings(only_env, env: dict[str, str]) -> Settings:
    only_env(env)
    return Settings(_env_file=None)


def engine_config(only_env, env: dict[str, str], argv: list[str] = ()) -> EngineConfig:
    """The EngineConfig that `flylora-engine <argv>` builds in a container with ``env``."""
    from flylora_runtime.engine.launcher import build_parser

    only_env(env)
    config = EngineConfig(**vars(build_parser().parse_args(list(argv))))
    assert config.dtype in DTYPES, config.dtype
    return config


def under(path: str | Path, mounts: list[str]) -> bool:
    return any(Path(path) == Path(m) or Path(m) in Path(path).parents for m in mounts)


# --- every variable is real --------------------------------------------------------------------------------

def test_the_settings_list_is_what_the_code_reads():
    assert {"FLYLORA_GATEWAY_PORT", "FLYLORA_ENGINE_URLS", "FLYLORA_ADMIN_KEY", "FLYLORA_DATABASE_URL"} <= REAL_ENV
    assert {"FLYLORA_ENGINE_PORT", "FLYLORA_ENGINE_HOST", "FLYLORA_ENGINE_DTYPE", "FLYLORA_ADAPTER_STORE",
            "FLYLORA_DATA_DIR", "FLYLORA_BASE_MODEL_DIR"} <= code_env_names()


@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_flylora_variable_in_deploy_files_is_a_real_setting(path):
    used = set(ENV_NAME.findall(path.read_text()))
    unknown = used - REAL_ENV
    assert not unknown, f"{path.name} names {sorted(unknown)}, which no code reads (typo? Settings ignores them)"


# --- Dockerfile -------------------------------------------------------------------------------------------

def test_dockerfile_gateway_listens_where_it_exposes_and_checks_health(only_env):
    gateway = dockerfile_stages(DOCKERFILE.read_text())["gateway"]
    settings = gateway_settings(only_env, gateway["env"])
    assert settings.gateway_host == "0.0.0.0"
    assert gateway["expose"] == [settings.gateway_port]
    assert "'FLYLORA_GATEWAY_PORT', '%d'" % settings.gateway_port in gateway["healthcheck"]
    assert settings.data_dir == Path("/data") and settings.store_dir == Path("/data/adapters")
    assert settings.db_url == "sqlite:////data/registry/registry.db"


@pytest.mark.parametrize("stage", ["engine-cpu", "engine-gpu"])
def test_dockerfile_engine_listens_where_it_exposes_and_checks_health(only_env, stage):
    engine = dockerfile_stages(DOCKERFILE.read_text())[stage]
    config = engine_config(only_env, engine["env"])
    assert config.host == "0.0.0.0"
    assert engine["expose"] == [config.port]
    assert "'FLYLORA_ENGINE_PORT', '%d'" % config.port in engine["healthcheck"]
    assert config.adapter_store == "/data/adapters"
    assert config.model == "/data/models/SmolLM2-135M-Instruct"


# --- docker-compose ---------------------------------------------------------------------------------------

#: What an operator exports before `docker compose up` (the file refuses to start without them).
OPERATOR_ENV = {"FLYLORA_ADMIN_KEY": "a" * 8 + "0123456789abcdef" * 3,
                "FLYLORA_ENGINE_API_KEY": "e" * 8 + "fedcba9876543210" * 3}


@pytest.fixture
def compose() -> dict:
    return compose_interpolate(yaml.safe_load(COMPOSE.read_text()), env=OPERATOR_ENV)


def container_mounts(service: dict) -> list[str]:
    return [v.split(":")[1] for v in service.get("volumes", [])]


@pytest.mark.parametrize("engine_service", ["engine", "engine-cpu"])
def test_compose_gateway_and_engine_agree(only_env, compose, engine_service):
    services = compose["services"]
    gw, eng = services["gateway"], services[engine_service]
    settings = gateway_settings(only_env, gw["environment"])
    config = engine_config(only_env, eng["environment"], eng["command"])

    # The gateway listens on the published container port; its healthcheck probes that port.
    assert settings.gateway_host == "0.0.0.0"
    assert [p.rsplit(":", 1)[1] for p in gw["ports"]] == [str(settings.gateway_port)]
    assert f"127.0.0.1:{settings.gateway_port}/health" in " ".join(gw["healthcheck"]["test"])

    # The gateway's engine URL names the engine's network alias and its port.
    assert len(settings.engine_urls) == 1
    url = urlsplit(settings.engine_urls[0])
    assert url.hostname in eng["networks"]["internal"]["aliases"] and url.port == config.port
    assert config.host == "0.0.0.0"
    assert f"127.0.0.1:{config.port}/health" in " ".join(eng["healthcheck"]["test"])

    # Same adapter store, same base model (folder and served name), each on a mounted volume.
    assert str(settings.store_dir) == config.adapter_store and under(config.adapter_store, container_mounts(eng))
    assert under(settings.store_dir, container_mounts(gw))
    assert str(settings.base_dir) == config.model and under(config.model, container_mounts(eng))
    assert under(settings.base_dir, container_mounts(gw))
    assert config.served_model_name == settings.base_model_id
    assert under(Path(settings.db_url.removeprefix("sqlite:///")), container_mounts(gw))

    # The engine key: the same on both sides, and the engine may listen beyond loopback only with it.
    assert config.api_key == settings.engine_api_key.get_secret_value() == OPERATOR_ENV["FLYLORA_ENGINE_API_KEY"]

    # Only the gateway's API port is published (not its metrics port); the engine sits on the internal network.
    assert settings.metrics_port is not None and settings.metrics_port != settings.gateway_port
    assert [name for name, s in services.items() if s.get("ports")] == ["gateway"]
    assert list(eng["networks"]) == ["internal"] and compose["networks"]["internal"]["internal"] is True


def test_compose_gpu_engine_reserves_a_gpu_and_cpu_engine_does_not(compose):
    gpu = compose["services"]["engine"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "deploy" not in compose["services"]["engine-cpu"]
    assert compose["services"]["engine"]["profiles"] == ["gpu"]
    assert compose["services"]["engine-cpu"]["profiles"] == ["cpu"]
    assert compose["services"]["engine"]["build"]["target"] == "engine-gpu"
    assert compose["services"]["engine-cpu"]["build"]["target"] == "engine-cpu"
    assert compose["services"]["gateway"]["build"]["target"] == "gateway"
    assert {"adapters", "registry", "models"} <= set(compose["volumes"])


def test_compose_prometheus_scrapes_the_ports_the_processes_listen_on(only_env, compose):
    prom = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in prom["scrape_configs"]}
    settings = gateway_settings(only_env, compose["services"]["gateway"]["environment"])
    config = engine_config(only_env, compose["services"]["engine"]["environment"])
    assert targets == {"flylora-gateway": [f"gateway:{settings.metrics_port}"],
                       "flylora-engine": [f"engine:{config.port}"]}
    mounted = {Path(v.split(":")[1]).name for v in compose["services"]["prometheus"]["volumes"]}
    assert {"prometheus.yml", *prom["rule_files"]} <= mounted


# --- Kubernetes ---------------------------------------------------------------------------------------------

@pytest.fixture
def k8s() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in k8s_objects()}


def pod_env(k8s, container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s[("ConfigMap", source["configMapRef"]["name"])]["data"])
        if "secretRef" in source:
            env.update(operator_secret(k8s[("Secret", source["secretRef"]["name"])]))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = operator_secret(k8s[("Secret", ref["name"])])[ref["key"]]
    return env


def operator_secret(secret: dict) -> dict[str, str]:
    """The Secret as an operator applies it: the CHANGE-ME placeholders replaced (the processes refuse them)."""
    values = {**secret["stringData"]}
    for name in ("FLYLORA_ADMIN_KEY", "FLYLORA_ENGINE_API_KEY"):
        values[name] = OPERATOR_ENV[name]
    return values


def expand_k8s_args(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def named_port(container: dict, name_or_number) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name_or_number)


def test_k8s_gateway_and_engines_agree(only_env, k8s):
    engine_set, gateway_dep = k8s[("StatefulSet", "flylora-engine")], k8s[("Deployment", "flylora-gateway")]
    eng_pod, gw_pod = engine_set["spec"]["template"], gateway_dep["spec"]["template"]
    eng_c, gw_c = eng_pod["spec"]["containers"][0], gw_pod["spec"]["containers"][0]
    gw_env, eng_env = pod_env(k8s, gw_c), pod_env(k8s, eng_c)
    settings = gateway_settings(only_env, gw_env)
    config = engine_config(only_env, eng_env, expand_k8s_args(eng_c["args"], eng_env))

    # Ports: container ports, Services, probes and scrape annotations all match what the processes bind.
    assert settings.gateway_host == "0.0.0.0" and config.host == "0.0.0.0"
    assert named_port(gw_c, "http") == settings.gateway_port
    assert named_port(eng_c, "http") == config.port
    for svc_name, container, port in (("flylora-gateway", gw_c, settings.gateway_port),
                                      ("flylora-engine", eng_c, config.port)):
        svc = k8s[("Service", svc_name)]["spec"]["ports"][0]
        assert named_port(container, svc["targetPort"]) == port and svc["port"] == port
    assert int(gw_pod["metadata"]["annotations"]["prometheus.io/port"]) == settings.metrics_port
    assert named_port(gw_c, "metrics") == settings.metrics_port != settings.gateway_port
    assert settings.metrics_port not in [p["port"] for p in k8s[("Service", "flylora-gateway")]["spec"]["ports"]]
    assert config.api_key == settings.engine_api_key.get_secret_value()
    assert int(eng_pod["metadata"]["annotations"]["prometheus.io/port"]) == config.port
    assert eng_c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert named_port(eng_c, eng_c["readinessProbe"]["httpGet"]["port"]) == config.port
    assert eng_c["resources"]["limits"]["nvidia.com/gpu"] == "1"

    # One engine URL per StatefulSet replica, through the headless Service, on the engine's port.
    headless = k8s[("Service", engine_set["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    ns = engine_set["metadata"]["namespace"]
    name = engine_set["metadata"]["name"]
    expected = [f"http://{name}-{i}.{headless['metadata']['name']}.{ns}.svc.cluster.local:{config.port}"
                for i in range(engine_set["spec"]["replicas"])]
    assert settings.engine_urls == expected

    # Shared adapter store and base model on the RWX volumes.
    assert str(settings.store_dir) == config.adapter_store
    assert str(settings.base_dir) == config.model and config.served_model_name == settings.base_model_id
    mounts = {c: [m["mountPath"] for m in c_["volumeMounts"]] for c, c_ in (("gw", gw_c), ("eng", eng_c))}
    assert under(settings.store_dir, mounts["gw"]) and under(config.adapter_store, mounts["eng"])
    assert under(settings.base_dir, mounts["gw"]) and under(config.model, mounts["eng"])
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in gw_pod["spec"]["volumes"] + eng_pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    for claim in set(claims.values()):
        assert k8s[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]

    # Several gateway replicas share the registry: it must not be SQLite on a shared volume.
    assert settings.db_url.startswith("postgresql")
    hpa = k8s[("HorizontalPodAutoscaler", "flylora-gateway")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "flylora-gateway" and hpa["minReplicas"] >= 2


def test_k8s_service_links_cannot_shadow_a_setting(k8s):
    """Kubernetes injects <SERVICE>_PORT=tcp://ip:port for every Service: flylora-engine -> FLYLORA_ENGINE_PORT,
    the engine's own port setting. Pods must then turn service links off."""
    shadowing = {name for (kind, name) in k8s if kind == "Service"
                 and {name.upper().replace("-", "_") + "_PORT", name.upper().replace("-", "_") + "_SERVICE_HOST"}
                 & REAL_ENV}
    assert shadowing == {"flylora-engine", "flylora-gateway"}
    for (kind, name), obj in k8s.items():
        if kind in ("Deployment", "StatefulSet"):
            assert obj["spec"]["template"]["spec"]["enableServiceLinks"] is False, name


def test_k8s_pods_run_as_the_images_non_root_user(k8s):
    for (kind, name), obj in k8s.items():
        if kind in ("Deployment", "StatefulSet"):
            sc = obj["spec"]["template"]["spec"]["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, name


def test_k8s_metrics_port_is_reachable_from_monitoring_only(only_env, k8s):
    gw_c = k8s[("Deployment", "flylora-gateway")]["spec"]["template"]["spec"]["containers"][0]
    settings = gateway_settings(only_env, pod_env(k8s, gw_c))
    policy = k8s[("NetworkPolicy", "flylora-gateway")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "flylora-gateway"}
    by_port = {p["port"]: rule.get("from") for rule in policy["ingress"] for p in rule["ports"]}
    assert set(by_port) == {settings.gateway_port, settings.metrics_port}
    assert by_port[settings.gateway_port] is None  # the API: open to the cluster (the ingress decides the rest)
    assert by_port[settings.metrics_port] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_shipped_secret_placeholders_are_refused_by_gateway_and_engine(only_env, k8s):
    """deploy/k8s/secret.yaml applied unchanged must not give a running service with a known admin key."""
    from pydantic import ValidationError

    shipped = k8s[("Secret", "flylora-secrets")]["stringData"]
    only_env({})
    with pytest.raises(ValidationError, match="FLYLORA_ADMIN_KEY is refused: .*placeholder"):
        Settings(_env_file=None, admin_key=shipped["FLYLORA_ADMIN_KEY"])
    with pytest.raises(ValidationError, match="FLYLORA_ENGINE_API_KEY is refused: .*placeholder"):
        Settings(_env_file=None, engine_api_key=shipped["FLYLORA_ENGINE_API_KEY"])
    config = EngineConfig(host="0.0.0.0", api_key=shipped["FLYLORA_ENGINE_API_KEY"])
    with pytest.raises(ValueError, match="FLYLORA_ENGINE_API_KEY is refused: .*placeholder"):
        config.validate()


def test_compose_postgres_override_gives_the_gateway_a_reachable_registry(only_env, compose):
    from sqlalchemy.engine import make_url

    override = compose_interpolate(yaml.safe_load((REPO / "deploy" / "compose" / "postgres.yml").read_text()),
                                   env={**OPERATOR_ENV, "POSTGRES_PASSWORD": "p" * 32})
    pg = override["services"]["postgres"]
    gw_env = {**compose["services"]["gateway"]["environment"], **override["services"]["gateway"]["environment"]}
    url = make_url(gateway_settings(only_env, gw_env).db_url)
    assert (url.drivername, url.host, url.port, url.database) == ("postgresql+psycopg", "postgres", 5432,
                                                                  pg["environment"]["POSTGRES_DB"])
    assert (url.username, url.password) == (pg["environment"]["POSTGRES_USER"], "p" * 32)
    assert "ports" not in pg and set(pg["networks"]) <= set(compose["services"]["gateway"]["networks"])
    assert override["services"]["gateway"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert pg["image"].startswith("postgres:15")
