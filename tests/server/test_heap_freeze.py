"""The gateway's Python heap frozen once it has started (server.app.freeze_startup_heap), as ``flylora-gateway``
serves it, and thawed at shutdown; the fake engine test double stands in for vLLM."""

from __future__ import annotations

import gc

from server.app import create_app
from server.settings import Settings

from tests.server.conftest import BASE_ID, start_fake_engine
from tests.server.gateway_process import GatewayProcess
from tests.server.helpers import ADMIN_KEY, ServerThread, write_base_model


def test_an_app_built_to_freeze_freezes_after_start_up_and_thaws_at_shutdown(tmp_path) -> None:
    engine = start_fake_engine()
    write_base_model(tmp_path / "models" / BASE_ID)
    settings = Settings(_env_file=None, data_dir=tmp_path, engine_urls=[engine.url], admin_key=ADMIN_KEY,
                        base_model_id=BASE_ID, health_check_interval_s=0)  # type: ignore[call-arg]
    gc.unfreeze()
    try:
        plain = ServerThread(create_app(settings)).start()  # the default (what tests build): nothing frozen
        assert gc.get_freeze_count() == 0
        plain.stop()
        server = ServerThread(create_app(settings, freeze_heap=True)).start()
        try:
            assert gc.get_freeze_count() > 10_000  # the modules, the app, this process's start-up
        finally:
            server.stop()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        engine.server.stop()


def test_flylora_gateway_serves_with_its_heap_frozen(tmp_path) -> None:
    with GatewayProcess(tmp_path, log_level="info") as gw:
        assert gw.client().get("/health").status_code == 200
    log = gw.log.read_text()
    assert log.count("gateway heap frozen after start-up") == 1, log[-2000:]
