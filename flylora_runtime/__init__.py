"""FlyLoRA runtime: adapter format, reference math, kernels and the vLLM plugin.

Knows FlyLoRA and vLLM, nothing of HTTP or tenants. Torch-free modules (safe for the gateway to import):
``config``, ``errors``, ``modelspec``, ``checkpoint``, ``paths``.
"""

__version__ = "0.1.0"
