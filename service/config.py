"""Service settings, read from ``CN4_*`` environment variables and an optional config file.

Precedence, highest first: arguments passed to :class:`ServiceSettings`, environment variables
(``CN4_DATABASE_URL``, ``CN4_API_TOKEN``, ...), the YAML or JSON file named by
``CN4_CONFIG_FILE``, the defaults below.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from search.errors import Cn4Error
from search.paths import cn4_home

MIB = 1024 * 1024


class ServiceConfigError(Cn4Error, ValueError):
    """A service setting with an invalid value, or an unsafe combination of settings."""


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Settings from the YAML or JSON file named by ``CN4_CONFIG_FILE``, if it is set."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._data = self._read()

    @staticmethod
    def _read() -> dict[str, Any]:
        name = os.environ.get("CN4_CONFIG_FILE")
        if not name:
            return {}
        path = Path(name).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ServiceConfigError(
                f"CN4_CONFIG_FILE={name!r} cannot be read ({exc}): point it at a YAML or JSON file"
            ) from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ServiceConfigError(f"config file {path} is not valid YAML or JSON: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ServiceConfigError(
                f"config file {path} contains a {type(data).__name__}: write a mapping of settings"
            )
        return data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {key: value for key, value in self._data.items() if key in self.settings_cls.model_fields}


class ServiceSettings(BaseSettings):
    """Settings of the API server and the workers."""

    model_config = SettingsConfigDict(env_prefix="CN4_", extra="ignore")

    # Empty means a SQLite file under CN4_HOME (see ``resolved_database_url``).
    database_url: str = ""
    # Root of uploaded models, job outputs and device files; empty means CN4_HOME/service.
    data_dir: Path | None = None
    # Directories whose checkpoints may be registered by path; uploads land in data_dir/models.
    # In the environment: directories separated by os.pathsep (":" on POSIX), or a JSON list.
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    host: str = "127.0.0.1"
    # 0 binds any free port.
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer token for write requests; required when ``host`` is not a loopback address.
    api_token: str | None = None
    # Require the token on loopback as well (when a token is set).
    require_token_on_loopback: bool = False
    # Start a worker thread inside ``cn4 serve``.
    embedded_worker: bool = True
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    poll_seconds: float = 1.0
    # Claims per job before a job whose lease keeps expiring is failed.
    max_attempts: int = 3
    max_upload_bytes: int = 2048 * MIB
    max_measurement_bytes: int = 32 * MIB
    max_batch_jobs: int = 5000

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part for part in value.split(os.pathsep) if part]
        return value

    @field_validator("lease_seconds", "heartbeat_seconds", "poll_seconds")
    @classmethod
    def _positive_seconds(cls, value: float, info: Any) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name}={value} is invalid: give a positive number of seconds")
        return value

    @field_validator("max_attempts")
    @classmethod
    def _positive_attempts(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"max_attempts={value} is invalid: give at least 1")
        return value

    @property
    def resolved_data_dir(self) -> Path:
        directory = self.data_dir.expanduser() if self.data_dir else cn4_home() / "service"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'cn4.db'}"

    @property
    def upload_root(self) -> Path:
        return self.resolved_data_dir / "models"

    @property
    def allowed_model_roots(self) -> list[Path]:
        """Model roots as resolved absolute paths, the upload directory included."""
        roots = [root.expanduser().resolve() for root in self.model_roots]
        roots.append(self.upload_root.resolve())
        return roots

    @property
    def token_required(self) -> bool:
        if not self.api_token:
            return False
        return self.require_token_on_loopback or not is_loopback(self.host)

    def check_bind_safety(self) -> None:
        """Raise ServiceConfigError when the server would accept writes from the network unguarded."""
        if not is_loopback(self.host) and not self.api_token:
            raise ServiceConfigError(
                f"host={self.host!r} is not a loopback address and no API token is set: set "
                "CN4_API_TOKEN to a secret, or bind to 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
