"""Settings and the routes file: validation, defaults, and errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings, normalise_database_url
from app.routing.config import RoutesFileError, default_routes, load_routes, load_routes_file

ROOT = Path(__file__).resolve().parents[2]


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_every_setting_is_in_env_example() -> None:
    listed = {
        line.split("=", 1)[0].strip()
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - listed == set()
    assert listed - fields == set()


def test_every_setting_in_env_example_has_a_comment() -> None:
    """Each variable sits under a comment: its own, or its paragraph's."""
    uncommented, commented = [], False
    for line in (ROOT / ".env.example").read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            commented = False  # a blank line starts a new paragraph
        elif stripped.startswith("#"):
            commented = True
        elif not commented:
            uncommented.append(stripped.split("=", 1)[0])
    assert uncommented == []


def test_env_example_parses_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [f for f in Settings.model_fields if f.endswith("_api_key")]:
        monkeypatch.delenv(name.upper(), raising=False)
    s = Settings(_env_file=ROOT / ".env.example")
    assert s.flywheel_env == "dev"
    assert s.redis_url is None
    assert s.database_url is None
    assert s.flywheel_config is None
    assert s.openai_api_key is None
    # Blank keys are unset: only the demo routes, no example route without a key.
    assert set(load_routes(s).routes) == {"demo", "demo-cycle"}


def test_blank_values_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "  ")
    monkeypatch.setenv("FLYWHEEL_CONFIG", "")
    # As .env.example has it: blank means the default under the var dir, not ".".
    monkeypatch.setenv("FLYWHEEL_FILES_DIR", "")
    s = settings()
    assert s.flywheel_files_dir is None
    assert s.files_dir == s.flywheel_var_dir / "files"
    assert s.openai_api_key is None
    assert s.routes_path is None or s.routes_path.is_file()
    assert s.provider_key("OPENAI_API_KEY") is None


@pytest.mark.parametrize("env", ["staging", "prod"])
def test_master_key_required_outside_dev(env: str) -> None:
    with pytest.raises(ValidationError, match="FLYWHEEL_MASTER_KEY"):
        settings(flywheel_env=env)
    assert settings(flywheel_env=env, flywheel_master_key="m" * 32).flywheel_env == env


def test_policy_and_env_are_checked() -> None:
    with pytest.raises(ValidationError):
        settings(flywheel_policy="cheapest")
    with pytest.raises(ValidationError):
        settings(flywheel_env="production")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@h:5432/db", "postgresql+asyncpg://u:p@h:5432/db"),
        ("postgresql://h/db", "postgresql+asyncpg://h/db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql+asyncpg://h/db", "postgresql+asyncpg://h/db"),
    ],
)
def test_database_url_normalised(url: str, expected: str) -> None:
    assert normalise_database_url(url) == expected
    assert settings(database_url=url).database_dsn == expected


def test_default_database_is_sqlite_under_var(tmp_path: Path) -> None:
    assert settings(flywheel_var_dir=tmp_path).database_dsn == (
        f"sqlite+aiosqlite:///{tmp_path}/flywheel.db"
    )


def test_secrets_are_masked_in_repr() -> None:
    s = settings(openai_api_key="sk-very-secret-value", flywheel_master_key="master-secret")
    assert "sk-very-secret-value" not in repr(s)
    assert "master-secret" not in str(s.model_dump())


def test_default_routes_demo_and_keyed_examples() -> None:
    assert set(default_routes(settings()).routes) == {"demo", "demo-cycle"}
    keyed = default_routes(settings(openai_api_key="sk-x", anthropic_api_key="a"))
    assert {"demo", "gpt-4o-mini", "claude-haiku"} <= set(keyed.routes)


def test_example_routes_file_is_valid() -> None:
    routes = load_routes_file(ROOT / "flywheel.example.yaml")
    assert "demo" in routes.routes


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("routes: [1, 2", "not valid YAML"),
        ("routes: {}", "routes"),
        (
            "routes:\n  r:\n    deployments: []\n",
            "routes.r: Value error, a route needs deployments",
        ),
        (
            "routes:\n  r:\n    strategy: fastest\n    deployments:\n"
            "      - {name: a, provider: mock, model: m}\n",
            "routes.r.strategy",
        ),
        (
            "routes:\n  r:\n    deployments:\n      - {name: a, provider: nope, model: m}\n",
            "routes.r.deployments.0.provider",
        ),
        (
            "routes:\n  r:\n    deployments:\n"
            "      - {name: a, provider: mock, model: m, wieght: 2}\n",
            "routes.r.deployments.0.wieght",
        ),
        (
            "routes:\n  r:\n    fallbacks: [ghost]\n    deployments:\n"
            "      - {name: a, provider: mock, model: m}\n",
            "ghost",
        ),
        (
            "routes:\n  r:\n    deployments:\n      - {name: a, provider: mock, model: m}\n"
            "      - {name: a, provider: mock, model: n}\n",
            "unique",
        ),
    ],
)
def test_bad_routes_file_names_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(RoutesFileError) as info:
        load_routes_file(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_routes_file(tmp_path: Path) -> None:
    with pytest.raises(RoutesFileError, match="cannot read"):
        load_routes_file(tmp_path / "absent.yaml")


def test_route_cache_mode_reads_bare_yaml_on_and_off(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "routes:\n"
        "  a: {deployments: [{name: m, provider: mock, model: m}], cache: {mode: on}}\n"
        "  b: {deployments: [{name: m, provider: mock, model: m}], cache: {mode: off}}\n"
    )
    routes = load_routes_file(path)
    modes = {name: r.cache.mode for name, r in routes.routes.items() if r.cache is not None}
    assert modes == {"a": "on", "b": "off"}
