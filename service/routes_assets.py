"""Routes for what jobs use: models (``/v1/models``), devices with their measurements
(``/v1/devices``) and fitted latency models (``/v1/latency-models``)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from search.errors import Cn4Error
from service.api import MAX_ROW_ID, RowId, SessionDep, SettingsDep, WriteAccess
from service.resolve import check_inside_roots
from service.schemas import (
    DeviceCreate,
    DeviceOut,
    LatencyModelFit,
    LatencyModelOut,
    MeasurementUploadOut,
    ModelDetail,
    ModelOut,
    ModelRegister,
    PredictOut,
    PredictRequest,
    iso,
)
from service.tables import Device, LatencyModel, Measurement, ModelRecord, now

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

# Files an uploaded checkpoint may contain: config, safetensors weights, tokenizer files.
UPLOAD_FILE_NAMES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja",
})
UPLOAD_CHUNK_BYTES = 1024 * 1024

_report_cache: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
_report_lock = threading.Lock()


# --- models -----------------------------------------------------------------------------------


def _model_out(record: ModelRecord) -> dict[str, Any]:
    return {
        "id": record.id, "name": record.name, "path": record.path, "source": record.source,
        "arch": record.arch, "fingerprint": record.fingerprint,
        "created_at": iso(record.created_at),
    }


def _default_model() -> dict[str, Any]:
    from search.models import DEFAULT_MODEL_DIR

    return {
        "id": None, "name": "default", "path": str(DEFAULT_MODEL_DIR), "source": "embedded",
        "arch": None, "fingerprint": None, "created_at": None,
    }


def _load(path: str):
    from search.models import load_checkpoint

    return load_checkpoint(path)


def _layer_report(path: str, fingerprint: str | None) -> tuple[list[dict[str, Any]], str, str]:
    """Return the eligibility report, arch and fingerprint of a checkpoint, cached per process."""
    from search.models import layer_report

    key = (path, fingerprint)
    with _report_lock:
        cached = _report_cache.get(key)
    if cached is not None and fingerprint is not None:
        return cached, "", fingerprint
    loaded = _load(path)
    report = [
        {
            "name": info.name, "block": info.block, "kind": info.kind,
            "out_features": info.out_features, "in_features": info.in_features,
            "eligible": info.eligible, "reason": info.reason,
        }
        for info in layer_report(loaded.model)
    ]
    with _report_lock:
        _report_cache[(path, loaded.fingerprint)] = report
    return report, loaded.arch, loaded.fingerprint


def _store_model(session, *, name: str, path: Path, source: str) -> ModelRecord:
    loaded = _load(str(path))
    record = ModelRecord(
        name=name, path=str(path), source=source, arch=loaded.arch,
        fingerprint=loaded.fingerprint, created_at=now(),
    )
    session.add(record)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise HTTPException(
            status_code=409, detail=f"a model named {name!r} exists already: choose another name"
        ) from None
    logger.info("model %s registered (%s, %s)", name, source, path)
    return record


def _check_new_model_name(session, name: str) -> None:
    exists = session.execute(select(ModelRecord.id).where(ModelRecord.name == name)).first()
    if name == "default" or exists:
        raise HTTPException(
            status_code=409, detail=f"a model named {name!r} exists already: choose another name"
        )


@router.post("/models", status_code=201, response_model=ModelOut, tags=["models"],
             dependencies=[WriteAccess])
def register_model(body: ModelRegister, session: SessionDep, settings: SettingsDep):
    """Register a checkpoint directory under one of the configured model roots."""
    _check_new_model_name(session, body.name)
    roots = [root.expanduser().resolve() for root in settings.model_roots]
    try:
        path = check_inside_roots(body.path, roots, what="checkpoint directory")
    except ValueError as exc:
        raise HTTPException(status_code=403, detail=str(exc)) from None
    if not path.is_dir():
        raise HTTPException(
            status_code=422,
            detail=f"checkpoint directory {body.path!r} not found: give a directory under "
            f"{', '.join(map(str, roots))} that holds config.json and model.safetensors",
        )
    return _model_out(_store_model(session, name=body.name, path=path, source="registered"))


def _load_upload(partial: Path, name: str) -> None:
    """Load an uploaded checkpoint from its temporary directory to check it.

    A checkpoint error names the uploaded files instead of the temporary directory, which the
    client never sees and which is deleted when the upload fails.
    """
    try:
        _load(str(partial))
    except Cn4Error as exc:
        message = str(exc).replace(repr(str(partial)), f"upload {name!r}")
        message = message.replace(f"{partial}{os.sep}", "").replace(str(partial), f"upload {name!r}")
        raise type(exc)(message) from exc


@router.post("/models/upload", status_code=201, response_model=ModelOut, tags=["models"],
             dependencies=[WriteAccess])
async def upload_model(
    session: SessionDep,
    settings: SettingsDep,
    name: str = Form(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$"),
    files: list[UploadFile] = File(description="config.json, *.safetensors and tokenizer files"),
):
    """Upload a checkpoint: config, safetensors weights and tokenizer files (no pickle files)."""
    _check_new_model_name(session, name)
    names = [Path(upload.filename or "").name for upload in files]
    for upload_name in names:
        if not (upload_name in UPLOAD_FILE_NAMES or upload_name.endswith(".safetensors")):
            raise HTTPException(
                status_code=422,
                detail=f"file {upload_name!r} is not accepted: upload config.json, *.safetensors "
                f"weights and tokenizer files ({', '.join(sorted(UPLOAD_FILE_NAMES))}); pickle "
                "weights (.bin, .pt) are never loaded",
            )
    if len(set(names)) != len(names):
        raise HTTPException(status_code=422, detail=f"file names repeat in the upload: {names}")
    target = settings.upload_root / name
    if target.exists():
        raise HTTPException(status_code=409, detail=f"upload directory {target} exists already: choose another name")
    partial = settings.upload_root / f".{name}.{uuid.uuid4().hex}.partial"
    partial.mkdir(parents=True)
    try:
        total = 0
        for upload, upload_name in zip(files, names):
            with (partial / upload_name).open("wb") as handle:
                while chunk := await upload.read(UPLOAD_CHUNK_BYTES):
                    total += len(chunk)
                    if total > settings.max_upload_bytes:
                        raise HTTPException(
                            status_code=413,
                            detail=f"the upload exceeds {settings.max_upload_bytes} bytes: raise "
                            "CN4_MAX_UPLOAD_BYTES or register the directory under a model root",
                        )
                    handle.write(chunk)
        _load_upload(partial, name)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        return _model_out(_store_model(session, name=name, path=target, source="uploaded"))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


@router.get("/models", response_model=list[ModelOut], tags=["models"])
def list_models(session: SessionDep):
    records = session.execute(select(ModelRecord).order_by(ModelRecord.id)).scalars()
    return [_default_model(), *(_model_out(record) for record in records)]


@router.get("/models/{name}", response_model=ModelDetail, tags=["models"])
def get_model(name: str, session: SessionDep):
    """Return a model with its layer eligibility report (every Linear, eligible or not, with reason)."""
    if name == "default":
        out = _default_model()
    else:
        record = session.execute(select(ModelRecord).where(ModelRecord.name == name)).scalar_one_or_none()
        if record is None:
            raise HTTPException(
                status_code=404, detail=f"model {name!r} not found: list models with GET /v1/models"
            )
        out = _model_out(record)
    layers, arch, fingerprint = _layer_report(out["path"], out["fingerprint"])
    out["arch"] = out["arch"] or arch
    out["fingerprint"] = out["fingerprint"] or fingerprint
    eligible = [layer for layer in layers if layer["eligible"]]
    return {
        **out,
        "layers": layers,
        "eligible_layers": len(eligible),
        "eligible_weights": sum(layer["out_features"] * layer["in_features"] for layer in eligible),
    }


# --- devices and measurements -----------------------------------------------------------------


def _get_device(session, device_id: int) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise HTTPException(
            status_code=404, detail=f"device {device_id} not found: list devices with GET /v1/devices"
        )
    return device


def _device_out(session, device: Device) -> dict[str, Any]:
    count = session.execute(
        select(func.count()).select_from(Measurement).where(Measurement.device_id == device.id)
    ).scalar_one()
    latest = session.execute(
        select(func.max(LatencyModel.id)).where(LatencyModel.device_id == device.id)
    ).scalar_one()
    return {
        "id": device.id, "name": device.name, "description": device.description,
        "measurement_count": count, "latest_latency_model_id": latest,
        "created_at": iso(device.created_at),
    }


@router.post("/devices", status_code=201, response_model=DeviceOut, tags=["devices"],
             dependencies=[WriteAccess])
def create_device(body: DeviceCreate, session: SessionDep):
    if body.name == "local":
        raise HTTPException(
            status_code=422, detail="device name 'local' is reserved for this machine: choose another"
        )
    device = Device(name=body.name, description=body.description, created_at=now())
    session.add(device)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise HTTPException(
            status_code=409, detail=f"a device named {body.name!r} exists already: choose another name"
        ) from None
    logger.info("device %d created (%s)", device.id, device.name)
    return _device_out(session, device)


@router.get("/devices", response_model=list[DeviceOut], tags=["devices"])
def list_devices(session: SessionDep):
    devices = session.execute(select(Device).order_by(Device.id)).scalars().all()
    return [_device_out(session, device) for device in devices]


@router.get("/devices/{device_id}", response_model=DeviceOut, tags=["devices"])
def get_device(device_id: RowId, session: SessionDep):
    return _device_out(session, _get_device(session, device_id))


@router.post("/devices/{device_id}/measurements", status_code=201,
             response_model=MeasurementUploadOut, tags=["devices"], dependencies=[WriteAccess])
async def upload_measurements(
    device_id: RowId,
    session: SessionDep,
    settings: SettingsDep,
    file: UploadFile = File(description="a cn4.latency/1 file: CSV with header or JSON Lines"),
    format: str | None = Query(default=None, pattern="^(csv|jsonl|json)$",
                               description="csv, jsonl or json; default: from the file name"),
):
    """Validate and store a measurement file; an invalid file stores nothing (422, with rows)."""
    from latency_models.measurements import SUFFIX_FORMATS, parse_measurements

    _get_device(session, device_id)
    data = await file.read(settings.max_measurement_bytes + 1)
    if len(data) > settings.max_measurement_bytes:
        raise HTTPException(
            status_code=413,
            detail=f"the measurement file exceeds {settings.max_measurement_bytes} bytes: split it "
            "or raise CN4_MAX_MEASUREMENT_BYTES",
        )
    fmt = format or SUFFIX_FORMATS.get(Path(file.filename or "").suffix.lower())
    parsed = parse_measurements(data, fmt)
    upload_id = uuid.uuid4().hex
    created = now()
    session.execute(
        insert(Measurement),
        [
            {"device_id": device_id, "upload_id": upload_id, "record": record.to_dict(),
             "created_at": created}
            for record in parsed.records
        ],
    )
    session.commit()
    logger.info("device %d: stored %d measurements (upload %s)", device_id, len(parsed.records), upload_id)
    return {"device_id": device_id, "upload_id": upload_id, "records": len(parsed.records),
            "warnings": parsed.warnings}


@router.get("/devices/{device_id}/measurements", tags=["devices"])
def list_measurements(
    device_id: RowId, session: SessionDep,
    limit: int = Query(default=1000, ge=1, le=100_000),
    offset: int = Query(default=0, ge=0, le=MAX_ROW_ID),
) -> list[dict[str, Any]]:
    """Stored records in cn4.latency/1 field names."""
    _get_device(session, device_id)
    rows = session.execute(
        select(Measurement.record).where(Measurement.device_id == device_id)
        .order_by(Measurement.id).limit(limit).offset(offset)
    ).scalars()
    return list(rows)


# --- latency models ---------------------------------------------------------------------------


def _latency_model_out(record: LatencyModel) -> dict[str, Any]:
    from latency_models.cost_model import CostModel

    cost_model = CostModel.load(record.path)
    return {
        "id": record.id, "device_id": record.device_id,
        "measurement_count": record.measurement_count, "models": cost_model.models(),
        "fit_report": record.fit_report, "warnings": cost_model.warnings,
        "created_at": iso(record.created_at),
    }


@router.post("/devices/{device_id}/latency-models", status_code=201,
             response_model=LatencyModelOut, tags=["latency models"], dependencies=[WriteAccess])
def fit_latency_model(device_id: RowId, body: LatencyModelFit, session: SessionDep,
                      settings: SettingsDep):
    """Fit a cost model to every measurement of the device and return its accuracy report."""
    from latency_models.cost_model import CostModel
    from latency_models.measurements import Measurement as MeasurementRecord

    device = _get_device(session, device_id)
    rows = session.execute(
        select(Measurement.record).where(Measurement.device_id == device_id)
    ).scalars().all()
    if not rows:
        raise HTTPException(
            status_code=409,
            detail=f"device {device.name!r} has no measurements: upload a file with "
            f"POST /v1/devices/{device_id}/measurements first",
        )
    records = [MeasurementRecord.from_dict(row) for row in rows]
    cost_model = CostModel.fit(records, **body.model_dump())
    path = settings.resolved_data_dir / "latency_models" / f"device-{device_id}-{uuid.uuid4().hex[:12]}.json"
    cost_model.save(path)
    record = LatencyModel(
        device_id=device_id, path=str(path), measurement_count=len(records),
        fit_report=cost_model.fit_report, created_at=now(),
    )
    session.add(record)
    session.commit()
    logger.info("device %d: latency model %d fitted on %d records", device_id, record.id, len(records))
    return _latency_model_out(record)


@router.get("/devices/{device_id}/latency-models", response_model=list[LatencyModelOut],
            tags=["latency models"])
def list_latency_models(device_id: RowId, session: SessionDep):
    _get_device(session, device_id)
    records = session.execute(
        select(LatencyModel).where(LatencyModel.device_id == device_id).order_by(LatencyModel.id)
    ).scalars()
    return [_latency_model_out(record) for record in records]


def _get_latency_model(session, model_id: int) -> LatencyModel:
    record = session.get(LatencyModel, model_id)
    if record is None:
        raise HTTPException(
            status_code=404,
            detail=f"latency model {model_id} not found: fit one with "
            "POST /v1/devices/{device_id}/latency-models",
        )
    return record


@router.get("/latency-models/{model_id}", response_model=LatencyModelOut, tags=["latency models"])
def get_latency_model(model_id: RowId, session: SessionDep):
    return _latency_model_out(_get_latency_model(session, model_id))


@router.post("/latency-models/{model_id}/predict", response_model=PredictOut,
             tags=["latency models"])
def predict(model_id: RowId, body: PredictRequest, session: SessionDep):
    """Predict a whole model's latency (ms per call over ``tokens`` tokens) for a level map."""
    from latency_models.cost_model import CostModel

    cost_model = CostModel.load(_get_latency_model(session, model_id).path)
    model_key = body.model
    if model_key is None:
        known = cost_model.models()
        if len(known) != 1:
            raise HTTPException(
                status_code=422,
                detail=f"model is unset and the latency model knows {len(known)} models {known}: "
                "give one of them as 'model'",
            )
        model_key = known[0]
    if body.layers is not None:
        shapes = [tuple(layer) for layer in body.layers]
    elif body.checkpoint is not None:
        shapes = _shapes_from_checkpoint(session, body.checkpoint, body.levels)
    else:
        raise HTTPException(
            status_code=422,
            detail="give the layer shapes: 'checkpoint' (a model name) with 'levels', or "
            "'layers' as [out_features, in_features, level] triples",
        )
    latency = cost_model.predict_model(shapes, model=model_key, tokens=body.tokens)
    return {"latency_ms": latency, "model": model_key, "tokens": body.tokens, "layers": len(shapes)}


def _shapes_from_checkpoint(session, checkpoint: str, levels: dict[str, int]) -> list[tuple[int, int, int]]:
    detail = get_model(checkpoint, session)
    eligible = {layer["name"]: layer for layer in detail["layers"] if layer["eligible"]}
    unknown = sorted(set(levels) - set(eligible))
    if unknown:
        raise HTTPException(
            status_code=422,
            detail=f"levels name layers that are not eligible in {checkpoint!r}: {unknown[:5]}; "
            f"see GET /v1/models/{checkpoint} for the eligible layers",
        )
    bad = {name: level for name, level in levels.items() if level not in (0, 1, 2, 3)}
    if bad:
        raise HTTPException(
            status_code=422, detail=f"levels {bad} are invalid: a Cn4 level is 0, 1, 2 or 3 zeros of 4"
        )
    return [
        (layer["out_features"], layer["in_features"], levels.get(name, 0))
        for name, layer in eligible.items()
    ]
