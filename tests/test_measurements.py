"""Tests of the cn4.latency/1 measurement format: parsing, validation, warnings, duplicates."""

from __future__ import annotations

import json
import logging
import math

import pytest

from latency_models.measurements import (
    COLUMNS,
    DUPLICATE_CONFLICT_FACTOR,
    FORMAT_VERSION,
    Measurement,
    combine_duplicates,
    format_measurements,
    parse_measurements,
    read_measurements,
    write_measurements,
)
from search.errors import MeasurementError

HEADER = "format,device,backend,op,out_features,in_features,level,tokens,median_ms,p10_ms,p90_ms"


def linear_row(median: str, *, level: int = 0, shape: str = "256,128", spread=("", "")) -> str:
    return f"{FORMAT_VERSION},x86,cn4-numba,linear,{shape},{level},1,{median},{spread[0]},{spread[1]}"


def csv_text(*rows: str) -> str:
    return "\n".join([HEADER, *rows]) + "\n"


def sample_records() -> list[Measurement]:
    return [
        Measurement(
            device="x86",
            backend="cn4-numba",
            op="linear",
            out_features=1536,
            in_features=768,
            level=2,
            tokens=1,
            threads=2,
            median_ms=0.1234567891234,
            p10_ms=0.12,
            p90_ms=0.13,
            mean_ms=0.124,
            std_ms=0.003,
            repeats=200,
            warmup=20,
            timestamp="2026-12-04T20:15:00+00:00",
            tool_version="0.1.0",
        ),
        Measurement(
            device="x86",
            backend="cn4-numba",
            op="model",
            model="embedded",
            levels={
                "backbone.layers.0.mixer.in_proj": (1536, 768, 2),
                "backbone.layers.0.mixer.out_proj": (768, 768, 0),
            },
            tokens=1,
            median_ms=4.45,
        ),
        Measurement(
            device="x86", backend="cn4-numba", op="remainder", model="embedded", median_ms=4.1
        ),
        Measurement(device="phone", op="linear", out_features=8, in_features=8, level=3, tokens=16, median_ms=2e-3),
    ]


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip_keeps_records(tmp_path, suffix):
    records = sample_records()
    path = write_measurements(records, tmp_path / f"m{suffix}")

    result = read_measurements(path)

    assert result.records == records
    assert result.warnings == []


def test_csv_round_trip_writes_levels_as_json_cell(tmp_path):
    path = write_measurements(sample_records(), tmp_path / "m.csv")
    lines = path.read_text().splitlines()

    assert lines[0] == ",".join(COLUMNS)
    assert '"{""backbone.layers.0.mixer.in_proj"": [1536, 768, 2]' in lines[2]
    assert len(lines) == 5


def test_jsonl_round_trip_writes_objects(tmp_path):
    path = write_measurements(sample_records(), tmp_path / "m.jsonl")
    objects = [json.loads(line) for line in path.read_text().splitlines()]

    assert [o["op"] for o in objects] == ["linear", "model", "remainder", "linear"]
    assert objects[1]["levels"]["backbone.layers.0.mixer.out_proj"] == [768, 768, 0]
    assert all(o["format"] == FORMAT_VERSION for o in objects)
    assert "p10_ms" not in objects[2]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_append_adds_records(tmp_path, suffix):
    records = sample_records()
    path = tmp_path / f"m{suffix}"
    write_measurements(records[:2], path)
    write_measurements(records[2:], path, append=True)

    assert read_measurements(path).records == records
    if suffix == ".csv":
        assert path.read_text().count("format,device") == 1


def test_append_rejects_foreign_csv_header(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("device,median_ms\nx86,1\n")

    with pytest.raises(MeasurementError, match="cannot append"):
        write_measurements(sample_records(), path, append=True)


def test_json_array_accepted(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([r.to_dict() for r in sample_records()]))

    assert read_measurements(path).records == sample_records()


def test_parse_bytes_with_bom_and_sniffed_format():
    text = format_measurements(sample_records(), "csv").encode("utf-8")

    result = parse_measurements(b"\xef\xbb\xbf" + text)

    assert result.records == sample_records()
    jsonl = format_measurements(sample_records(), "jsonl").encode("utf-8")
    assert parse_measurements(jsonl).records == sample_records()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_parse_accepts_crlf_line_ends(fmt):
    text = format_measurements(sample_records(), fmt).replace("\n", "\r\n")

    assert parse_measurements(text.encode("utf-8"), fmt).records == sample_records()


def test_parse_error_names_upload_source():
    text = csv_text(linear_row("0"))

    with pytest.raises(MeasurementError, match=r"^upload m\.csv: row 1 \(line 2\): median_ms=0\.0"):
        parse_measurements(text, "csv", source="upload m.csv")


def test_parse_rejects_invalid_utf8():
    with pytest.raises(MeasurementError, match="not valid UTF-8"):
        parse_measurements(b"format,device\n\xff\xfe", "csv")


def test_levels_given_as_json_string_in_jsonl():
    record = sample_records()[1].to_dict()
    record["levels"] = json.dumps(record["levels"])

    result = parse_measurements(json.dumps(record), "jsonl")

    assert result.records[0].levels["backbone.layers.0.mixer.in_proj"] == (1536, 768, 2)


def test_csv_defaults_for_empty_cells():
    result = parse_measurements(csv_text(linear_row("0.5")), "csv")
    record = result.records[0]

    assert record.tokens == 1
    assert record.dtype == "float32"
    assert record.threads is None
    assert record.p10_ms is None


# ---------------------------------------------------------------------------------------------
# Rejected input


def test_negative_latency_names_row_and_line():
    text = csv_text(linear_row("0.5"), linear_row("-1", shape="512,128"))

    with pytest.raises(MeasurementError) as caught:
        parse_measurements(text, "csv")

    assert "row 2 (line 3)" in str(caught.value)
    assert "median_ms=-1.0" in str(caught.value)


def test_zero_latency_names_row_and_line():
    text = csv_text(linear_row("0.5"), linear_row("0.6", shape="512,128"), linear_row("0", level=1))

    with pytest.raises(MeasurementError) as caught:
        parse_measurements(text, "csv")

    assert "row 3 (line 4)" in str(caught.value)
    assert "median_ms=0.0" in str(caught.value)


def test_row_count_skips_blank_lines():
    text = HEADER + "\n" + linear_row("0.5") + "\n\n\n" + linear_row("-1") + "\n"

    with pytest.raises(MeasurementError, match=r"row 2 \(line 5\)"):
        parse_measurements(text, "csv")


def test_read_error_names_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(csv_text(linear_row("-1")))

    with pytest.raises(MeasurementError) as caught:
        read_measurements(path)

    assert str(caught.value).startswith(f"{path}: row 1 (line 2): median_ms=-1.0")


@pytest.mark.parametrize(
    ("median", "fragment"),
    [
        ("nan", "median_ms=nan is invalid"),
        ("inf", "median_ms=inf is invalid"),
        ("", "median_ms is missing"),
        ("fast", "median_ms='fast' is invalid"),
    ],
)
def test_invalid_median_rejected(median, fragment):
    with pytest.raises(MeasurementError) as caught:
        parse_measurements(csv_text(linear_row(median)), "csv")

    assert "row 1 (line 2)" in str(caught.value)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (f"{FORMAT_VERSION},x86,t,conv,256,128,0,1,1.0,,", "op='conv' is unknown"),
        (f"{FORMAT_VERSION},x86,t,linear,256,128,4,1,1.0,,", "level=4 is unknown"),
        (f"{FORMAT_VERSION},x86,t,linear,256,128,,1,1.0,,", "level is missing"),
        (f"{FORMAT_VERSION},x86,t,linear,,128,0,1,1.0,,", "out_features is missing"),
        (f"{FORMAT_VERSION},x86,t,linear,256,0,0,1,1.0,,", "in_features=0 is invalid"),
        (f"{FORMAT_VERSION},x86,t,linear,-3,128,0,1,1.0,,", "out_features=-3 is invalid"),
        (f"{FORMAT_VERSION},x86,t,linear,256.5,128,0,1,1.0,,", "out_features='256.5' is invalid"),
        (f"{FORMAT_VERSION},x86,t,linear,256,128,0,0,1.0,,", "tokens=0 is invalid"),
        (f"{FORMAT_VERSION},,t,linear,256,128,0,1,1.0,,", "device is missing"),
        ("cn4.latency/2,x86,t,linear,256,128,0,1,1.0,,", "format='cn4.latency/2' is not supported"),
        (f"{FORMAT_VERSION},x86,t,linear,256,128,0,1,1.0,1.5,", "p10_ms=1.5 is above median_ms"),
        (f"{FORMAT_VERSION},x86,t,linear,256,128,0,1,1.0,,0.5", "p90_ms=0.5 is below median_ms"),
        (f"{FORMAT_VERSION},x86,t,linear,256,128,0,1,1.0,-0.1,", "p10_ms=-0.1 is invalid"),
        (f"{FORMAT_VERSION},x86,t,remainder,,,,1,1.0,,", "model is missing"),
    ],
)
def test_invalid_field_rejected(row, fragment):
    with pytest.raises(MeasurementError) as caught:
        parse_measurements(csv_text(row), "csv")

    assert str(caught.value).startswith("row 1 (line 2): ")
    assert fragment in str(caught.value)


def model_row(levels_cell: str, *, median: float = 4.0) -> str:
    return json.dumps(
        {
            "format": FORMAT_VERSION,
            "device": "x86",
            "op": "model",
            "model": "embedded",
            "levels": levels_cell,
            "median_ms": median,
        }
    )


@pytest.mark.parametrize(
    ("levels_cell", "fragment"),
    [
        ('{"in_proj": [1536, 768, 2]', "levels is not valid JSON"),
        ("[1, 2, 3]", "levels=[1, 2, 3] is invalid"),
        ('{"in_proj": [1536, 768]}', "levels['in_proj']=[1536, 768] is invalid"),
        ('{"in_proj": [1536, 768, 5]}', "levels['in_proj'] level=5 is unknown"),
        ('{"in_proj": [0, 768, 1]}', "levels['in_proj'] out_features=0 is invalid"),
        ("", "levels is missing"),
    ],
)
def test_invalid_levels_rejected(levels_cell, fragment):
    good = model_row('{"in_proj": [1536, 768, 2]}')
    text = good + "\n" + model_row(levels_cell) + "\n"

    with pytest.raises(MeasurementError) as caught:
        parse_measurements(text, "jsonl")

    assert str(caught.value).startswith("row 2 (line 2): ")
    assert fragment in str(caught.value)


def test_shape_on_remainder_rejected():
    record = {"format": FORMAT_VERSION, "device": "x86", "op": "remainder", "model": "m"}
    text = json.dumps(dict(record, median_ms=1.0, out_features=256))

    with pytest.raises(MeasurementError, match=r"row 1 \(line 1\): out_features=256 is set"):
        parse_measurements(text, "jsonl")


def test_csv_levels_bad_json_names_row():
    header = "format,device,op,model,levels,median_ms"
    text = f'{header}\n{FORMAT_VERSION},x86,model,m,"{{""a"": [4, 4, 1],}}",1.0\n'

    with pytest.raises(MeasurementError, match=r"row 1 \(line 2\): levels is not valid JSON"):
        parse_measurements(text, "csv")


def test_missing_format_column_rejected():
    text = "device,op,median_ms\nx86,remainder,1.0\n"

    with pytest.raises(MeasurementError, match=r"line 1: required column\(s\) \['format'\]"):
        parse_measurements(text, "csv")


def test_unknown_column_rejected():
    text = csv_text(linear_row("1.0")).replace("p90_ms", "p95_ms")

    with pytest.raises(MeasurementError, match=r"unknown column\(s\) \['p95_ms'\]"):
        parse_measurements(text, "csv")


def test_unknown_jsonl_key_rejected():
    record = sample_records()[2].to_dict()
    record["latency"] = 3

    with pytest.raises(MeasurementError, match=r"row 1 \(line 1\): unknown field\(s\) \['latency'\]"):
        parse_measurements(json.dumps(record), "jsonl")


def test_invalid_jsonl_line_named():
    text = json.dumps(sample_records()[2].to_dict()) + "\n{not json\n"

    with pytest.raises(MeasurementError, match=r"row 2 \(line 2\): invalid JSON"):
        parse_measurements(text, "jsonl")


def test_too_many_cells_rejected():
    text = csv_text(linear_row("1.0") + ",extra")

    with pytest.raises(MeasurementError, match="12 cells for 11 columns"):
        parse_measurements(text, "csv")


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text(HEADER + "\n")

    with pytest.raises(MeasurementError, match="no measurement records"):
        read_measurements(path)


def test_unknown_suffix_rejected(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("x")

    with pytest.raises(MeasurementError, match="suffix '.txt'"):
        read_measurements(path)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(MeasurementError, match="not found"):
        read_measurements(tmp_path / "absent.csv")


def test_record_levels_lists_normalised():
    record = Measurement(device="x86", op="model", model="m", levels={"a": [8, 4, 1]}, median_ms=1.0)

    assert record.levels == {"a": (8, 4, 1)}
    assert record == Measurement(device="x86", op="model", model="m", levels={"a": (8, 4, 1)}, median_ms=1.0)
    assert len({record, record}) == 1


def test_record_constructor_validates():
    with pytest.raises(MeasurementError, match="level=7 is unknown"):
        Measurement(device="x86", op="linear", out_features=4, in_features=4, level=7, median_ms=1.0)
    with pytest.raises(MeasurementError, match="model is missing"):
        Measurement(device="x86", op="remainder", median_ms=1.0)
    with pytest.raises(MeasurementError, match=r"levels\['a'\]=\(8, 4\) is invalid"):
        Measurement(device="x86", op="model", model="m", levels={"a": (8, 4)}, median_ms=1.0)


# ---------------------------------------------------------------------------------------------
# Warnings and duplicates


def test_wide_spread_warned(caplog):
    # p90 - p10 is 0.8x the median: p90/p10 = 14/6 = 2.33.
    text = csv_text(linear_row("10", spread=("6", "14")), linear_row("10", shape="64,64", spread=("9.5", "10.6")))

    with caplog.at_level(logging.WARNING, logger="latency_models.measurements"):
        result = parse_measurements(text, "csv")

    assert len(result.records) == 2
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("row 1 (line 2): high spread")
    assert "p90/p10 = 2.33" in result.warnings[0]
    assert any("high spread" in message for message in caplog.messages)


def test_wide_spread_from_std_warned():
    record = Measurement(
        device="x86", op="remainder", model="m", median_ms=10, mean_ms=11, std_ms=4, repeats=20
    )

    result = parse_measurements(json.dumps(record.to_dict()), "jsonl")

    assert len(result.warnings) == 1
    assert "std_ms/mean_ms = 0.36" in result.warnings[0]


def test_conflicting_duplicates_combined(caplog):
    text = csv_text(
        linear_row("2000", spread=("1900", "2100")),
        linear_row("5", shape="64,64"),
        linear_row("200", spread=("190", "230")),
    )

    with caplog.at_level(logging.WARNING, logger="latency_models.measurements"):
        result = parse_measurements(text, "csv")

    assert len(result.records) == 2
    merged = result.records[0]
    assert merged.median_ms == pytest.approx(1100.0)
    assert merged.p10_ms == pytest.approx(190.0)
    assert merged.p90_ms == pytest.approx(2100.0)
    assert result.records[1].out_features == 64
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert "conflicting duplicates" in warning
    assert "row 1 (line 2), row 3 (line 4)" in warning
    assert "2000, 200" in warning
    assert "median_ms=1100" in warning
    assert any("conflicting duplicates" in message for message in caplog.messages)


def test_duplicates_pool_repeats_mean_and_std():
    base = dict(device="x86", op="linear", out_features=64, in_features=64, level=1)
    first = Measurement(**base, median_ms=1.0, mean_ms=1.0, std_ms=0.1, repeats=10, timestamp="2026-12-04T10:00:00+00:00")
    second = Measurement(**base, median_ms=1.1, mean_ms=1.2, std_ms=0.2, repeats=30, timestamp="2026-12-04T12:00:00+01:00")
    third = Measurement(**base, median_ms=1.05, mean_ms=1.1, std_ms=0.1, repeats=10, timestamp="2026-12-04T11:30:00")

    combined, warnings = combine_duplicates([first, second, third])

    assert warnings == []
    merged = combined[0]
    assert merged.median_ms == pytest.approx(1.05)
    assert merged.repeats == 50
    assert merged.mean_ms == pytest.approx((10 * 1.0 + 30 * 1.2 + 10 * 1.1) / 50)
    mean = merged.mean_ms
    pooled = (10 * (0.01 + (1.0 - mean) ** 2) + 30 * (0.04 + (1.2 - mean) ** 2) + 10 * (0.01 + (1.1 - mean) ** 2)) / 50
    assert merged.std_ms == pytest.approx(math.sqrt(pooled))
    # 11:30 UTC is the latest: 12:00+01:00 is 11:00 UTC.
    assert merged.timestamp == "2026-12-04T11:30:00"


def test_duplicates_within_factor_not_warned():
    base = dict(device="x86", op="remainder", model="m")
    records = [Measurement(**base, median_ms=1.0), Measurement(**base, median_ms=DUPLICATE_CONFLICT_FACTOR)]

    combined, warnings = combine_duplicates(records)

    assert warnings == []
    assert combined[0].median_ms == pytest.approx((1.0 + DUPLICATE_CONFLICT_FACTOR) / 2)


def test_different_threads_are_not_duplicates():
    base = dict(device="x86", op="remainder", model="m", median_ms=1.0)

    combined, _ = combine_duplicates([Measurement(**base, threads=1), Measurement(**base, threads=2)])

    assert len(combined) == 2


def test_model_records_differ_by_levels():
    base = dict(device="x86", op="model", model="m", median_ms=1.0)
    one = Measurement(**base, levels={"a": (4, 4, 1)})
    two = Measurement(**base, levels={"a": (4, 4, 2)})
    again = Measurement(**dict(base, median_ms=3.0), levels={"a": (4, 4, 1)})

    combined, warnings = combine_duplicates([one, two, again])

    assert len(combined) == 2
    assert combined[0].median_ms == pytest.approx(2.0)
    assert len(warnings) == 1


def test_read_without_combining_keeps_duplicates(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(csv_text(linear_row("2"), linear_row("2.1")))

    assert len(read_measurements(path, combine=False).records) == 2
    assert len(read_measurements(path).records) == 1
