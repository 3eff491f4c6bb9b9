"""The engine: ``flylora-engine`` (vLLM's OpenAI server with the plugin and FlyLoRA defaults,
:mod:`.launcher`) and child-process management (:mod:`.process`).
"""
