"""``flylora``: the command-line client of a FlyLoRA gateway (tenants, keys, adapters).

Talks to the gateway over HTTP only (:mod:`.api`) and validates adapters locally with
:mod:`flylora_runtime.format`; imports neither torch nor the gateway's server code.
"""
