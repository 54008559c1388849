"""Turning the names in a job spec into paths: models, devices and text files.

A spec submitted over HTTP may name a registered model (or ``default``), a device with uploaded
measurements (or ``local``), and text files. Paths are accepted only inside the configured model
roots or the service data directory, so a client cannot make the server read arbitrary files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from search.spec import SearchSpec, SpecError
from service.config import ServiceSettings
from service.tables import Device, LatencyModel, Measurement, ModelRecord

logger = logging.getLogger(__name__)

PATH_FIELDS = ("calibration_text", "evaluation_text")


def allowed_roots(settings: ServiceSettings) -> list[Path]:
    return [*settings.allowed_model_roots, settings.resolved_data_dir.resolve()]


def check_inside_roots(path: str | Path, roots: list[Path], *, what: str) -> Path:
    """Return ``path`` resolved, or raise SpecError when it lies outside every root."""
    resolved = Path(path).expanduser().resolve()
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    shown = ", ".join(str(root) for root in roots) or "none configured"
    raise SpecError(
        f"{what} {str(path)!r} lies outside the allowed directories ({shown}): register it "
        "under a model root (CN4_MODEL_ROOTS) or upload it"
    )


def resolve_model(session: Session, name: str, settings: ServiceSettings) -> str:
    """Return the checkpoint path (or ``default``) that a spec's ``model`` names."""
    if name == "default":
        return name
    record = session.execute(select(ModelRecord).where(ModelRecord.name == name)).scalar_one_or_none()
    if record is not None:
        return record.path
    if "/" not in name:
        raise SpecError(
            f"model {name!r} is not registered: register it with POST /v1/models, upload it "
            "with POST /v1/models/upload, or use 'default'"
        )
    path = check_inside_roots(name, settings.allowed_model_roots, what="model path")
    if not path.is_dir():
        raise SpecError(f"model path {name!r} is not a directory: give a checkpoint directory")
    return str(path)


def check_spec(session: Session, spec: SearchSpec, settings: ServiceSettings) -> None:
    """Raise SpecError when the spec names an unknown model or device, or a forbidden path."""
    resolve_model(session, spec.model, settings)
    if spec.device != "local":
        device = session.execute(select(Device).where(Device.name == spec.device)).scalar_one_or_none()
        if device is None:
            if "/" not in spec.device:
                raise SpecError(
                    f"device {spec.device!r} is not known: create it with POST /v1/devices and "
                    "upload its measurements, or use 'local'"
                )
            check_inside_roots(spec.device, allowed_roots(settings), what="device file")
    for name in PATH_FIELDS:
        value = getattr(spec, name, None)
        if value is not None:
            check_inside_roots(value, allowed_roots(settings), what=name)


def resolve_spec(
    engine: Engine, spec_data: dict[str, Any], settings: ServiceSettings, *, out_dir: Path
) -> SearchSpec:
    """Return the SearchSpec a worker runs: names replaced by paths, devices written to files.

    A device with a fitted latency model runs on its newest fit. For a device with measurements
    only, they are written to ``out_dir`` as JSON Lines, and the search fits them itself.
    """
    from latency_models.measurements import Measurement as MeasurementRecord
    from latency_models.measurements import write_measurements

    spec = SearchSpec.from_dict(dict(spec_data))
    with Session(engine) as session:
        check_spec(session, spec, settings)
        changes: dict[str, Any] = {"model": resolve_model(session, spec.model, settings)}
        device = session.execute(select(Device).where(Device.name == spec.device)).scalar_one_or_none()
        if device is not None:
            fitted = session.execute(
                select(LatencyModel)
                .where(LatencyModel.device_id == device.id)
                .order_by(LatencyModel.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            if fitted is not None:
                changes["device"] = fitted.path
            else:
                rows = session.execute(
                    select(Measurement.record).where(Measurement.device_id == device.id)
                ).scalars().all()
                if not rows:
                    raise SpecError(
                        f"device {device.name!r} has no measurements: upload a CSV or JSON Lines "
                        f"file with POST /v1/devices/{device.id}/measurements"
                    )
                path = out_dir / f"device-{device.id}.jsonl"
                write_measurements([MeasurementRecord.from_dict(row) for row in rows], path)
                changes["device"] = str(path)
    data = spec.to_dict()
    data.update(changes)
    return SearchSpec.from_dict(data)
