"""The OpenAI-compatible multi-tenant gateway. Never imports torch or vllm."""
