"""The `flywheel` command: run, serve, worker, migrate, profile, snapshot."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from app.config import Settings
from app.routing.config import RoutesFileError, load_routes

ROOT = Path(__file__).resolve().parent.parent


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        first = e.errors()[0]
        raise SystemExit(f"flywheel: bad settings: {first['msg']}") from None


def migrate(database_url: str | None = None) -> None:
    from alembic import command
    from alembic.config import Config

    # The checkout (or image) root holds alembic.ini and migrations/; fall back to the
    # working directory for installs that put the package elsewhere.
    root = ROOT if (ROOT / "alembic.ini").is_file() else Path.cwd()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    if database_url:
        config.attributes["database_url"] = database_url
    command.upgrade(config, "head")


def _masked(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else None
    if isinstance(value, Path):
        return str(value)
    return value


def profile(settings: Settings) -> dict[str, Any]:
    """The resolved environment profile, policy and routes, with secrets masked."""
    from app.routing.router import Router

    routes = load_routes(settings)
    router = Router(routes, settings)
    fields = {name: _masked(getattr(settings, name)) for name in type(settings).model_fields}
    out_routes: dict[str, Any] = {}
    for name, route in routes.routes.items():
        data = route.model_dump(mode="json", exclude_none=True)
        for d in data["deployments"]:
            d["enabled"] = f"{name}/{d['name']}" not in router.disabled
        out_routes[name] = data
    return {
        "environment": settings.flywheel_env,
        "policy": settings.flywheel_policy,
        "routes_file": str(settings.routes_path) if settings.routes_path else "(built-in)",
        "database": "postgresql" if "postgresql" in settings.database_dsn else "sqlite",
        "redis": "configured" if settings.redis_url else "embedded",
        "settings": fields,
        "routes": out_routes,
    }


async def _snapshot(settings: Settings, action: str, target: str | None) -> dict[str, Any]:
    """Run a snapshot command against the configured Redis, database and directory."""
    from redis.asyncio import Redis

    from app.store.db import make_engine
    from app.store.snapshots import Snapshots

    if settings.redis_dsn is None:
        raise SystemExit("flywheel: no Redis: set REDIS_URL (or start `flywheel run`)")
    # A restore writes up to thousands of entries in one transaction: not the gateway's
    # 250 ms request-path timeout.
    redis = Redis.from_url(settings.redis_dsn, socket_timeout=30, socket_connect_timeout=5)
    engine = make_engine(settings.database_dsn)
    store = Snapshots.from_settings(settings, redis, engine)
    try:
        if action == "create":
            return (await store.create()).as_dict()
        if action == "list":
            return {"data": [s.as_dict() for s in await store.listing()]}
        assert target is not None
        return await store.restore(target, allow_path=True)
    finally:
        await redis.aclose()
        await engine.dispose()


def snapshot(settings: Settings, action: str, target: str | None, as_json: bool) -> int:
    import asyncio

    import orjson
    from redis.exceptions import RedisError

    from app.store.snapshot_file import SnapshotError

    try:
        out = asyncio.run(_snapshot(settings, action, target))
    except SnapshotError as e:
        print(f"flywheel: snapshot {action}: {e}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as e:
        print(f"flywheel: snapshot {action}: Redis or the disk failed: {e}", file=sys.stderr)
        return 1
    if action != "list" or as_json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return 0
    for s in out["data"]:
        counts = " ".join(f"{k}={v}" for k, v in s["counts"].items())
        print(f"{s['id']}  {s['created']}  {s['size_bytes']:>10} B  {s['checksum']}  {counts}")
    if not out["data"]:
        print("no snapshots", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="the whole system in embedded mode (Redis, worker, gateway)")
    serve = sub.add_parser("serve", help="the gateway (uvicorn)")
    serve.add_argument("--workers", type=int, default=1)
    sub.add_parser("worker", help="an arq worker")
    sub.add_parser("migrate", help="alembic upgrade head")
    sub.add_parser("profile", help="print the resolved profile, policy and routes")
    snap = sub.add_parser("snapshot", help="snapshots of the learned state")
    snap_sub = snap.add_subparsers(dest="action", required=True)
    for name, text in (("create", "take one now"), ("list", "the indexed ones, newest first")):
        snap_sub.add_parser(name, help=text).add_argument("--json", action="store_true")
    restore = snap_sub.add_parser("restore", help="restore one into Redis")
    restore.add_argument("target", help="a snapshot id, or the path of a .json.gz file")
    restore.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    settings = _settings()
    if args.command == "snapshot":
        return snapshot(settings, args.action, getattr(args, "target", None), args.json)
    try:
        if args.command == "profile":
            import yaml

            print(yaml.safe_dump(profile(settings), sort_keys=False))
            return 0
        load_routes(settings)  # a bad routes file fails here, naming file and key
    except RoutesFileError as e:
        print(f"flywheel: {e}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        migrate(settings.database_dsn)
        return 0
    if args.command == "worker":
        arq = str(Path(sys.executable).parent / "arq")
        os.execv(arq, [arq, "workers.main.WorkerSettings"])  # noqa: S606
    if args.command == "serve":
        import uvicorn

        uvicorn.run(
            "app.main:app",
            host=settings.host,
            port=settings.port,
            workers=args.workers,
            access_log=False,
            proxy_headers=True,
        )
        return 0
    from app.embedded import run

    return run(settings, migrate)


if __name__ == "__main__":
    sys.exit(main())
