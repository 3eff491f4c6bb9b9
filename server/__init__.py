"""The FlyLoRA gateway: an OpenAI-compatible, multi-tenant HTTP front of vLLM engines.

Knows HTTP, tenants, the registry and engines; never imports torch or vllm.
"""

from server.app import create_app
from server.settings import Settings

__all__ = ["Settings", "create_app"]
