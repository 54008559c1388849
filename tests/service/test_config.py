"""Service settings: environment, config file, database URLs and the bind-safety check."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ServiceConfigError, ServiceSettings, is_loopback
from service.db import create_db_engine, normalise_url


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CN4_DATABASE_URL", "postgresql://u@db:5432/cn4")
    monkeypatch.setenv("CN4_MODEL_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("CN4_LEASE_SECONDS", "12.5")
    settings = ServiceSettings()
    assert settings.resolved_database_url == "postgresql://u@db:5432/cn4"
    assert settings.model_roots == [tmp_path / "a", tmp_path / "b"]
    assert settings.lease_seconds == 12.5


def test_settings_from_config_file(monkeypatch, tmp_path):
    config = tmp_path / "cn4.yaml"
    config.write_text("lease_seconds: 7\nmax_attempts: 5\nport: 9000\n")
    monkeypatch.setenv("CN4_CONFIG_FILE", str(config))
    monkeypatch.setenv("CN4_PORT", "9100")
    settings = ServiceSettings()
    assert settings.lease_seconds == 7
    assert settings.max_attempts == 5
    assert settings.port == 9100  # the environment wins over the file


def test_config_file_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("CN4_CONFIG_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ServiceConfigError, match="cannot be read"):
        ServiceSettings()
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    monkeypatch.setenv("CN4_CONFIG_FILE", str(listed))
    with pytest.raises(ServiceConfigError, match="write a mapping"):
        ServiceSettings()


def test_invalid_values_rejected():
    with pytest.raises(ValueError, match="lease_seconds=0"):
        ServiceSettings(lease_seconds=0)
    with pytest.raises(ValueError, match="max_attempts=0"):
        ServiceSettings(max_attempts=0)


def test_default_database_is_sqlite_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CN4_HOME", str(tmp_path))
    monkeypatch.delenv("CN4_DATABASE_URL", raising=False)
    settings = ServiceSettings()
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'service' / 'cn4.db'}"


def test_sqlite_connection_settings(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 30000
    finally:
        engine.dispose()


def test_database_urls_normalised():
    assert normalise_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ServiceConfigError, match="not supported"):
        normalise_url("mysql://u@h/d")
    with pytest.raises(ServiceConfigError, match="invalid"):
        normalise_url("not a url")


def test_bind_safety():
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("example.org")
    with pytest.raises(ServiceConfigError, match="0.0.0.0"):
        ServiceSettings(host="0.0.0.0", api_token=None).check_bind_safety()
    public = ServiceSettings(host="0.0.0.0", api_token="t")
    public.check_bind_safety()
    assert public.token_required
    assert not ServiceSettings(host="127.0.0.1", api_token="t").token_required
    assert ServiceSettings(host="127.0.0.1", api_token="t", require_token_on_loopback=True).token_required
    assert not ServiceSettings(host="127.0.0.1", api_token=None).token_required


def test_model_roots_include_uploads(tmp_path):
    settings = ServiceSettings(data_dir=tmp_path, model_roots=[Path("/srv/models")])
    assert settings.allowed_model_roots == [Path("/srv/models"), (tmp_path / "models").resolve()]
