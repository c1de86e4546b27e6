"""segmentctl's input handling: durations, CSV rows to commands, and what it refuses before publishing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from segmentctl.bulk import read_assignments
from segmentctl.cli import app
from shared.durations import parse_duration


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200),
                                               ("2d", 172_800), ("1w", 604_800), ("1d12h", 129_600), (" 2D ", 172_800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "d2", "-5", "1.5h", "0", "0s", "2d junk"])
def test_bad_durations_say_what_is_accepted(text):
    with pytest.raises(ValueError, match=r"duration|at least 1 second"):
        parse_duration(text)


def test_rows_become_one_command_each_with_ids_from_content_and_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("user_id,segment_slug,action,ttl\n1000,A,,\n1000,B,add,2d\n1001,A,remove,\n")
    parsed = read_assignments(path, actor="me")
    assert parsed.errors == []
    assert [row.line for row in parsed.rows] == [2, 3, 4]
    first, second, third = (row.command for row in parsed.rows)
    assert first == {"type": "update_user_segments", "command_id": first["command_id"], "user_id": 1000,
                     "add": ["A"], "actor": "me"}
    assert second["ttl_seconds"] == 172_800 and second["add"] == ["B"]
    assert third["remove"] == ["A"] and "add" not in third
    assert first["command_id"].endswith("-2") and len(first["command_id"]) <= 64
    again = read_assignments(path, actor="me")
    assert [r.command["command_id"] for r in again.rows] == [r.command["command_id"] for r in parsed.rows]
    path.write_text(path.read_text() + "1002,A,,\n")  # another file content: other ids
    assert read_assignments(path).rows[0].command["command_id"] != first["command_id"]


def test_invalid_rows_are_reported_by_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("user_id,segment_slug,action,ttl\n1,A,,\nabc,A,,\n2,BAD SLUG!,,\n3,A,remove,2d\n0,A,,\n"
                    "4,A,move,\n5,A,add,2y\n")
    parsed = read_assignments(path)
    assert [row.line for row in parsed.rows] == [2]
    errors = dict(parsed.errors)
    assert set(errors) == {3, 4, 5, 6, 7, 8}
    assert "not a positive integer" in errors[3]
    # Errors name the file's column and the rule in words, never a library's wording.
    assert errors[4] == "segment_slug: may only hold the letters A-Z and a-z, digits and _ - ."
    assert "only applies to add" in errors[5]
    assert errors[6] == "user_id: must be at least 1"
    assert "not one of add, remove" in errors[7]
    assert "not a duration" in errors[8]


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("user,slug\n1,A\n")
    with pytest.raises(ValueError, match="missing user_id, segment_slug"):
        read_assignments(path)


def test_cli_refuses_bad_input_before_touching_kafka(tmp_path):
    runner = CliRunner()
    # An unreachable broker: any of these reaching Kafka would fail with exit code 3, not 2.
    base = ["--bootstrap-servers", "127.0.0.1:1", "--timeout", "1"]
    result = runner.invoke(app, [*base, "user", "update", "1000"])
    assert result.exit_code == 2 and "give --add and/or --remove" in result.output
    result = runner.invoke(app, [*base, "user", "update", "1000", "--add", "A", "--ttl", "2x"])
    assert result.exit_code == 2 and "not a duration" in result.output
    result = runner.invoke(app, [*base, "user", "update", "1000", "--add", "A", "--ttl", "2d", "--expires-at",
                                 "2030-01-01T00:00:00Z"])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, [*base, "segment", "create", "BAD SLUG"])
    assert result.exit_code == 2 and "slug" in result.output and "must begin with a letter or a digit" in result.output
    result = runner.invoke(app, [*base, "segment", "create", "A", "--percent", "101"])
    assert result.exit_code == 2 and "less than or equal to 100" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,segment_slug\n1,A\nx,A\n")
    result = runner.invoke(app, [*base, "import", str(bad)])
    assert result.exit_code == 2 and "line 3" in result.output and "nothing published" in result.output


def test_cli_says_when_kafka_is_unreachable():
    result = CliRunner().invoke(app, ["--bootstrap-servers", "127.0.0.1:1", "--timeout", "1", "user", "create", "7"])
    assert result.exit_code == 3 and "unavailable" in result.output


def test_an_empty_slug_is_said_in_words(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("user_id,segment_slug\n1,\n")
    assert dict(read_assignments(path).errors) == {2: "segment_slug: must not be empty"}
