"""The gateway starts, answers /health and /ready, and proxies one chat request through the fake engine."""

from __future__ import annotations


def test_health_ready_and_one_chat_with_fake_engine(gateway, tenant):
    with gateway.client(None) as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client = gateway.openai(tenant[1])
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                         messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.model == "SmolLM2-135M-Instruct"
    assert out.choices[0].message.content.count(" w") == 3
