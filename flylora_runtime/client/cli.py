"""flylora: manage a FlyLoRA gateway's tenants, keys and adapters from the command line.

    export FLYLORA_BASE_URL=http://127.0.0.1:8000 FLYLORA_ADMIN_KEY=...
    flylora tenants create acme                      # prints acme's first API key (shown once)
    export FLYLORA_API_KEY=flk-...
    flylora adapters upload ./my-adapter --name support
    flylora adapters list --json | jq -r '.data[].id'

Tenant commands use the admin key, adapter commands a tenant key. The options below work before or after
the command; --json prints the gateway's JSON on stdout (errors as JSON on stderr), for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flylora_runtime.client import APIError, GatewayClient, MissingKey, Unreachable

DEFAULT_BASE_URL = "http://127.0.0.1:8000"

#: Exit codes (also in ``flylora --help``).
OK, FAILED, USAGE, INVALID_ADAPTER, AUTH, NOT_FOUND, CONFLICT, REFUSED, SERVER_ERROR, UNREACHABLE = range(10)
EXIT_CODES = """exit codes:
  0  success
  1  unexpected error (a bug: please report it)
  2  usage error: bad arguments, a missing key or confirmation
  3  the adapter failed local validation (nothing was sent)
  4  authentication failed (401/403: wrong, revoked or missing key)
  5  not found (404: tenant, key or adapter)
  6  conflict (409: the name is taken)
  7  request refused (other 4xx: invalid input, too large, rate limited)
  8  server error (5xx: the gateway or its engines failed)
  9  gateway unreachable or timed out"""
ENVIRONMENT = """environment:
  FLYLORA_BASE_URL   the gateway (default http://127.0.0.1:8000); --base-url overrides
  FLYLORA_API_KEY    a tenant key, for adapter commands; --api-key overrides
  FLYLORA_ADMIN_KEY  the admin key, for tenant commands; --admin-key overrides"""
#: Tenant and adapter names, as the gateway accepts them.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class UsageError(Exception):
    pass


def _name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a valid name: 1-64 of a-z 0-9 . _ - starting with a letter or digit")
    return value


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(int(ts), tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def _size(n: Any) -> str:
    try:
        value = float(n)
    except (TypeError, ValueError):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


# --- commands: each returns (json for --json, text for people) ----------------------------------------------

def tenants_create(gw: GatewayClient, a: argparse.Namespace) -> tuple[Any, str]:
    out = gw.new_tenant(a.name, max_concurrency=a.max_concurrency, tokens_per_minute=a.tokens_per_minute)
    return out, (f"created tenant {out['name']}\nAPI key (shown once, store it now; key id {out.get('key_id')}):\n"
                 f"{out['api_key']}")


def tenants_list(gw: GatewayClient, _a: argparse.Namespace) -> tuple[Any, str]:
    out = _listing(gw.list_tenants())
    limit = lambda v: "default" if v is None else str(v)  # noqa: E731
    rows = [[t["name"], str(t["adapters"]), limit(t.get("max_concurrency")), limit(t.get("tokens_per_minute")),
             _when(t.get("created"))] for t in out["data"]]
    return out, _table(rows, ["NAME", "ADAPTERS", "MAX CONCURRENCY", "TOKENS/MIN", "CREATED (UTC)"])


def tenants_delete(gw: GatewayClient, a: argparse.Namespace) -> tuple[Any, str]:
    _confirm(a, f"delete tenant {a.name!r} with all its adapters and keys")
    gw.delete_tenant(a.name)
    return {"deleted": a.name, "object": "tenant"}, f"deleted tenant {a.name} (its adapters and keys too)"


def tenants_new_key(gw: GatewayClient, a: argparse.Namespace) -> tuple[Any, str]:
    out = gw.new_key(a.name, label=a.label)
    return out, (f"new key {out.get('key_id')} for {a.name} (its other keys stay valid; shown once):\n"
                 f"{out['api_key']}")


def tenants_keys(gw: GatewayClient, a: argparse.Namespace) -> tuple[Any, str]:
    out = _listing(gw.list_keys(a.name))
    rows = [[str(k["id"]), k.get("hint") or "-", k.get("label") or "-", _when(k.get("created"))] for k in out["data"]]
    return out, _table(rows, ["KEY ID", "HINT", "LABEL", "CREATED (UTC)"])


def tenants_revoke_key(gw: GatewayClient, a: argparse.Namespace) -> tuple[Any, str]:
    _confirm(a, f"revoke key {a.key_id} of tenant {a.name!r}")
    gw.revoke_key(a.name, a.key_id)
    return ({"revoked": a.key_id, "tenant": a.name, "object": "api_key"},
            f"revoked key {a.key_id} of {a.name} (the tenant, its adapters and other keys stay)")


def adapters_upload(gw: GatewayClient, a: argparse.Namespace) -> tuple[Any, str]:
    folder = Path(a.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder (give the folder holding adapter_config.json and "
                         "adapter_model.safetensors)")
    name = a.name or folder.resolve().name.lower()
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"the folder name {name!r} is not a valid adapter name; give one with --name")
    if a.validate:
        from flylora_runtime.client.validate import validate_folder

        manifest = validate_folder(folder, base_config=Path(a.base_config) if a.base_config else None)
        _note(a, f"valid: r={manifest.config.r} top_k={manifest.config.top_k} "
                 f"{len(manifest.modules)} modules, {_size(manifest.weights_bytes)}")
    from flylora_runtime.client.validate import adapter_files

    _config, weights = adapter_files(folder)  # a pickle-only or incomplete folder is refused here, unsent
    total = weights.stat().st_size
    bar = _progress_bar(a, total, f"uploading {name}")
    try:
        out = gw.upload_adapter(name, folder, on_bytes=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    return out, f"uploaded adapter {out['id']} (r={out.get('r')}, top_k={out.get('top_k')}, {_size(out.get('bytes'))})"


def adapters_list(gw: GatewayClient, _a: argparse.Namespace) -> tuple[Any, str]:
    out = _listing(gw.list_adapters())
    rows = [[x["id"], str(x.get("r")), str(x.get("top_k")), x.get("routing", "-"), _size(x.get("bytes")),
             x.get("status", "-"), _when(x.get("created"))] for x in out["data"]]
    return out, _table(rows, ["NAME", "R", "TOP_K", "ROUTING", "SIZE", "STATUS", "CREATED (UTC)"])


def adapters_show(gw: GatewayClient, a: argparse.Namespace) -> tuple[Any, str]:
    out = gw.get_adapter(a.name)
    fields = ["id", "status", "base_model", "r", "top_k", "routing", "bytes", "sha256", "created"]
    shown = {**out, "bytes": f"{out.get('bytes')} ({_size(out.get('bytes'))})", "created": _when(out.get("created"))}
    return out, "\n".join(f"{f:<11}{shown.get(f)}" for f in fields)


def adapters_delete(gw: GatewayClient, a: argparse.Namespace) -> tuple[Any, str]:
    _confirm(a, f"delete adapter {a.name!r}")
    gw.delete_adapter(a.name)
    return {"deleted": a.name, "object": "adapter"}, f"deleted adapter {a.name}"


# --- helpers --------------------------------------------------------------------------------------------------

def _listing(data: list[dict[str, Any]]) -> dict[str, Any]:
    """A list as the gateway sends it (what --json prints)."""
    return {"object": "list", "data": data}


def environment_defaults() -> dict[str, str | None]:
    """Base URL and keys from the environment (``FLYLORA_BASE_URL``, ``FLYLORA_API_KEY``, ``FLYLORA_ADMIN_KEY``)."""
    return {"base_url": os.environ.get("FLYLORA_BASE_URL") or DEFAULT_BASE_URL,
            "api_key": os.environ.get("FLYLORA_API_KEY") or None,
            "admin_key": os.environ.get("FLYLORA_ADMIN_KEY") or None}


def _confirm(a: argparse.Namespace, what: str) -> None:
    if a.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to {what} without --yes (stdin is not a terminal)")
    answer = input(f"{what}? type 'yes' to confirm: ")
    if answer.strip().lower() != "yes":
        raise UsageError("not confirmed; nothing was changed")


def _note(a: argparse.Namespace, text: str) -> None:
    if not a.json and not a.quiet:
        print(text, file=sys.stderr)


def _progress_bar(a: argparse.Namespace, total: int, label: str) -> Any:
    """A tqdm bar on stderr when it is a terminal (and not --quiet/--no-progress); None otherwise."""
    if a.quiet or not a.progress or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the client extra brings it; without it, no bar
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr, leave=True)


def _global_options(p: argparse.ArgumentParser, env: dict[str, str | None], *, suppress: bool) -> None:
    """The options every command takes. On commands their default is SUPPRESS, so a value given before the
    command is not reset by the command's parser."""
    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("connection and output")
    g.add_argument("--base-url", default=d(env["base_url"]),
                   help=f"the gateway's URL (FLYLORA_BASE_URL; default {DEFAULT_BASE_URL})")
    g.add_argument("--api-key", default=d(env["api_key"]), help="tenant key for adapter commands (FLYLORA_API_KEY)")
    g.add_argument("--admin-key", default=d(env["admin_key"]),
                   help="admin key for tenant commands (FLYLORA_ADMIN_KEY)")
    g.add_argument("--timeout", type=float, default=d(600.0), help="seconds to wait for an answer (default 600)")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="print the gateway's JSON answer (errors as JSON on stderr)")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="print only the result (no progress bar, no notes)")


def build_parser() -> argparse.ArgumentParser:
    env = environment_defaults()
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="flylora", description=__doc__, epilog=f"{ENVIRONMENT}\n\n{EXIT_CODES}",
                                formatter_class=fmt)
    _global_options(p, env, suppress=False)
    groups = p.add_subparsers(dest="group", metavar="{tenants,adapters}", required=True)

    def command(parent: Any, name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_, description=help_, epilog=f"{ENVIRONMENT}\n\n{EXIT_CODES}",
                                formatter_class=fmt)
        _global_options(sub, env, suppress=True)
        sub.set_defaults(fn=fn)
        return sub

    def confirmable(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation (needed in scripts)")

    tenants = groups.add_parser("tenants", help="tenants and their API keys (admin key)",
                                description="Tenants and their API keys. Uses the admin key.").add_subparsers(
        dest="command", metavar="COMMAND", required=True)
    sub = command(tenants, "create", tenants_create, "create a tenant and print its first API key (shown once)")
    sub.add_argument("name", type=_name, help="tenant name: 1-64 of a-z 0-9 . _ -")
    sub.add_argument("--max-concurrency", type=int, help="requests in flight at once (default: the gateway's)")
    sub.add_argument("--tokens-per-minute", type=int,
                     help="token budget per minute, 0 unlimited (default: the gateway's)")
    command(tenants, "list", tenants_list, "list tenants with their adapter counts and limits")
    sub = command(tenants, "delete", tenants_delete, "delete a tenant with all its adapters and keys")
    sub.add_argument("name", type=_name)
    confirmable(sub)
    sub = command(tenants, "new-key", tenants_new_key, "issue another API key for a tenant (others stay valid)")
    sub.add_argument("name", type=_name)
    sub.add_argument("--label", help="what the key is for, shown in key listings (e.g. ci, prod-eu)")
    sub = command(tenants, "keys", tenants_keys, "list a tenant's keys: ids, hints, labels (never the keys)")
    sub.add_argument("name", type=_name)
    sub = command(tenants, "revoke-key", tenants_revoke_key,
                  "revoke one key by id; the tenant, its adapters and other keys stay")
    sub.add_argument("name", type=_name)
    sub.add_argument("key_id", type=int, help="the key's id, from `flylora tenants keys NAME`")
    confirmable(sub)

    adapters = groups.add_parser("adapters", help="your adapters (tenant key)",
                                 description="Your adapters. Uses a tenant key.").add_subparsers(
        dest="command", metavar="COMMAND", required=True)
    sub = command(adapters, "upload", adapters_upload,
                  "validate an adapter folder locally, then upload it (adapter_config.json + "
                  "adapter_model.safetensors, PEFT or FlyLoRA)")
    sub.add_argument("folder", help="the adapter folder (as written by PEFT's save_pretrained)")
    sub.add_argument("--name", type=_name, help="the adapter's name (default: the folder's name)")
    sub.add_argument("--base-config", help="the base model's config.json (or its folder): validate the shapes "
                                           "exactly as the gateway will")
    sub.add_argument("--no-validate", dest="validate", action="store_false",
                     help="skip the local check (the gateway validates anyway)")
    sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    command(adapters, "list", adapters_list, "list your adapters")
    sub = command(adapters, "show", adapters_show, "show one adapter")
    sub.add_argument("name", type=_name)
    sub = command(adapters, "delete", adapters_delete, "delete an adapter (it stops serving at once)")
    sub.add_argument("name", type=_name)
    confirmable(sub)
    return p


def _exit_code(status: int) -> int:
    if status in (401, 403):
        return AUTH
    if status == 404:
        return NOT_FOUND
    if status == 409:
        return CONFLICT
    return REFUSED if status < 500 else SERVER_ERROR


def _fail(a: argparse.Namespace, code: int, message: str, error: dict[str, Any] | None = None) -> int:
    if a.json:
        print(json.dumps({"error": error or {"message": message, "type": None, "param": None, "code": None},
                          "exit_code": code}), file=sys.stderr)
    else:
        print(f"flylora: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        # Each command sends one key, never the other: tenant commands the admin key, adapter commands a tenant key.
        key = {"admin_key": a.admin_key} if a.group == "tenants" else {"api_key": a.api_key}
        with GatewayClient(a.base_url, timeout=a.timeout, upload_timeout=a.timeout, user_agent="flylora-cli",
                           **key) as gw:
            out, text = a.fn(gw, a)
    except UsageError as exc:
        return _fail(a, USAGE, str(exc))
    except MissingKey as exc:
        which = "the admin key (--admin-key or FLYLORA_ADMIN_KEY)" if exc.admin else \
            "a tenant key (--api-key or FLYLORA_API_KEY)"
        return _fail(a, USAGE, f"this command needs {which}")
    except Unreachable as exc:
        return _fail(a, UNREACHABLE, exc.message)
    except APIError as exc:
        detail = f" (HTTP {exc.status}{', ' + exc.code if exc.code else ''})"
        return _fail(a, _exit_code(exc.status), exc.message + detail, exc.error)
    except KeyboardInterrupt:
        return _fail(a, FAILED, "interrupted")
    except Exception as exc:  # noqa: BLE001 - local validation errors and the unexpected
        from flylora_runtime.format.errors import AdapterError

        if isinstance(exc, AdapterError):
            return _fail(a, INVALID_ADAPTER, f"the adapter is invalid, nothing was uploaded: {exc}",
                         {"message": str(exc), "type": "invalid_adapter", "param": exc.key, "code": "invalid_adapter"})
        if isinstance(exc, OSError):
            return _fail(a, USAGE, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return _fail(a, FAILED, f"unexpected {type(exc).__name__}: {exc}")
    print(json.dumps(out, indent=2) if a.json else text)
    return OK


if __name__ == "__main__":
    raise SystemExit(main())
