"""The `flywheel` command: run, serve, worker, migrate, profile."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="the whole system in embedded mode (Redis, worker, gateway)")
    serve = sub.add_parser("serve", help="the gateway (uvicorn)")
    serve.add_argument("--workers", type=int, default=1)
    sub.add_parser("worker", help="an arq worker")
    sub.add_parser("migrate", help="alembic upgrade head")
    sub.add_parser("profile", help="print the resolved profile, policy and routes")
    args = parser.parse_args(argv)
    settings = _settings()
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
