"""``flylora-gateway``: serve the gateway with uvicorn.

Settings come from the environment (``FLYLORA_*``) and an optional dotenv file (``--env-file`` or
``FLYLORA_ENV_FILE``). ``--host`` / ``--port`` override the settings. When no admin key is configured one is
generated and printed once, to stderr. With ``FLYLORA_METRICS_PORT`` set, ``/metrics`` is served on that port
only (:mod:`server.serve`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from pydantic import SecretStr, ValidationError

from server.security import new_api_key
from server.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flylora-gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--env-file", default=os.environ.get("FLYLORA_ENV_FILE"),
                   help="dotenv file with FLYLORA_* settings (the environment wins over it)")
    p.add_argument("--host", help="listen address (FLYLORA_GATEWAY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (FLYLORA_GATEWAY_PORT, default 8000)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="log every request (costs throughput; /metrics counts them anyway)")
    return p


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("gateway_host", args.host), ("gateway_port", args.port)) if v is not None}
    settings = Settings(_env_file=args.env_file, **overrides)  # type: ignore[call-arg]
    if settings.admin_key is None:
        key = "flk-admin-" + new_api_key()[4:]
        settings.admin_key = SecretStr(key)
        print(f"FLYLORA_ADMIN_KEY was not set; the admin key for this run is:\n{key}", file=sys.stderr, flush=True)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        print(f"flylora-gateway: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from server import serve
    from server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # SIGTERM (a container stop, `kill`): uvicorn stops accepting, lets requests in flight (streams too) finish
    # for shutdown_grace_s, cuts the rest, closes the registry; then it re-raises the signal it caught, which
    # this handler absorbs so that a clean stop exits 0 (docs/RELIABILITY.md).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    serve.run(create_app(settings, freeze_heap=True), settings, log_level=args.log_level, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
