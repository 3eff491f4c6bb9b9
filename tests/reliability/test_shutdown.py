"""Graceful shutdown with the real engine (runs last: it stops the session's engine).

* The engine (``flylora-engine``, vLLM's drain with ``--shutdown-timeout``) gets SIGTERM, as from a container
  stop (to its main process only), while streams run through the gateway: each stream finishes with
  ``[DONE]`` and all its tokens, the engine exits 0; meanwhile the gateway answers new requests with a clean
  503, never a broken connection.
* The gateway is stopped the way uvicorn stops on SIGTERM (the process-level signal, exit code and grace
  are tested in tests/server/test_shutdown_with_fake_engine.py) and started again on the same registry and
  store, and the engine restarted: every adapter is listed, intact, and answers exactly as before.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from server.app import create_app
from tests.reliability.conftest import Stack, async_client, request, run
from tests.server.helpers import ServerThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKENS = 48


def test_engine_sigterm_drains_streams_exits_0_and_state_survives_restarts(stack: Stack):
    stack.ensure_engine()
    key = stack.tenant("shutdown")
    names = ["sd-0", "sd-1"]
    for i, name in enumerate(names):
        assert stack.upload(key, name, seed=300 + i).status_code == 201
    expected = {n: stack.complete(key, n).json()["choices"][0]["text"] for n in names}
    proc = stack.engine.process.proc
    marks: dict[str, float] = {}

    async def main():
        async with async_client(stack.url) as client:
            streams = [asyncio.create_task(request(client, "shutdown", key, names[i % 2], stream=True,
                                                   max_tokens=TOKENS)) for i in range(4)]
            live_seen = time.monotonic() + 120
            while stack.gw.upstream.router.replicas[stack.engine.url].in_flight < 4:
                assert time.monotonic() < live_seen
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # the streams are under way
            marks["term"] = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            during = []
            while proc.poll() is None and time.monotonic() - marks["term"] < 60:
                during.append(await request(client, "shutdown", key, names[0], stream=False, max_tokens=2))
                await asyncio.sleep(0.3)
            code = await asyncio.to_thread(proc.wait, 60)
            marks["exited"] = time.monotonic()
            return await asyncio.gather(*streams), during, code

    streams, during, code = run(main())
    report = {"exit_code": code, "exit_s": round(marks["exited"] - marks["term"], 1),
              "streams": [(o.status, o.events, o.done, o.error and o.error.get("code")) for o in streams],
              "requests_during_shutdown": sorted({o.status for o in during})}
    print("\nSHUTDOWN REPORT " + json.dumps(report))
    assert code == 0, report
    assert all(o.ok and o.events == TOKENS for o in streams), report  # drained, not cut
    assert not [o.transport_error for o in during if o.transport_error]
    assert all(o.status in (200, 503) for o in during), report

    # Restart the gateway (same settings: registry and store) and the engine.
    stack.server.stop()
    stack.app = create_app(stack.settings)
    stack.server = ServerThread(stack.app).start()
    stack.engine.start()
    stack.ensure_engine()
    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {key}"}, timeout=60) as c:
        listed = {a["id"]: a["status"] for a in c.get("/v1/adapters").json()["data"]}
        assert listed == {n: "ready" for n in names}
        for name in names:
            assert c.get(f"/v1/adapters/{name}").json()["status"] == "ready"
            r = stack.complete(key, name)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[name], r.text
    assert stack.gw.store.ids() == stack.gw.registry.all_internal_ids()
    stack.engine.stop()
