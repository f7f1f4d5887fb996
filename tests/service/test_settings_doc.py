"""docs/settings.md holds one row per setting, generated from ``Settings``, and stays current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.config import Settings
from service.settings_doc import (
    BEGIN,
    DOC_PATH,
    END,
    REGENERATE,
    env_name,
    main,
    settings_table,
    update_document,
)

ROW = re.compile(r"^\| `(FER_[A-Z0-9_]+)` \| (.*?) \| (.*?) \| (.*) \|$")


def _rows(table: str) -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in table.splitlines():
        m = ROW.match(line)
        if m:
            rows[m[1]] = (m[2], m[3], m[4])
    return rows


def test_docs_settings_md_matches_settings() -> None:
    current = DOC_PATH.read_text(encoding="utf-8")
    assert current == update_document(current), (
        f"{DOC_PATH.name} is out of date with service.config.Settings; regenerate it with `{REGENERATE}`")


def test_every_setting_has_one_row_with_a_default() -> None:
    rows = _rows(DOC_PATH.read_text(encoding="utf-8"))
    wanted = {env_name(n, f) for n, f in Settings.model_fields.items()}
    assert set(rows) == wanted, f"rows without a setting: {sorted(set(rows) - wanted)}; " \
                                f"settings without a row: {sorted(wanted - set(rows))}"
    for env in ("FER_MAX_BATCH_IMAGES", "FER_DETECTOR_BATCH_SIZE", "FER_DETECTOR_MAX_SIDE", "FER_WARMUP"):
        assert env in rows
    assert all(default for _, default, _ in rows.values())


@pytest.mark.parametrize("name", [n for n, f in Settings.model_fields.items()
                                  if isinstance(f.default, bool | int | float | str)
                                  and f.default is not None])
def test_documented_default_round_trips(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default shown for a scalar setting, set as its environment variable, gives the
    value that an unset variable gives."""
    field = Settings.model_fields[name]
    env = env_name(name, field)
    _, default, _ = _rows(settings_table())[env]
    m = re.fullmatch(r"`([^`]*)`(?: \(.*\))?", default)
    assert m, f"{env}: default cell {default!r} is not one value in backticks"
    monkeypatch.setenv(env, m[1])
    assert getattr(Settings(), name) == field.default


def test_machine_paths_are_not_shown() -> None:
    table = settings_table()
    home = str(Path.home())
    repo = str(DOC_PATH.parents[1])
    assert "`checkpoints/default.safetensors`" in table
    assert "`~/.cache/fer-service`" in table
    for path in {home, repo} - {"/"}:
        assert f"`{path}/" not in table


def test_cells_are_escaped() -> None:
    rows = _rows(settings_table())
    assert "\\|yaw\\|" in rows["FER_FRONTALIZE_MIN_YAW"][2]  # a pipe would end the cell
    assert "<" not in settings_table()                       # <name> would be an HTML tag
    assert rows["FER_MAX_BATCH_SIZE"][0] == "int, [1, 1024]"
    assert rows["FER_DETECTION_THRESHOLD"][0] == "float, (0, 1)"
    assert rows["FER_BACKEND"][0] == "`auto`, `torch` or `onnx`"


def test_update_keeps_the_prose_and_needs_the_markers() -> None:
    doc = f"intro\n\n{BEGIN}\n| stale |\n{END}\n\nafter\n"
    out = update_document(doc)
    assert out.startswith(f"intro\n\n{BEGIN}\n\n| variable |") and out.endswith(f"\n{END}\n\nafter\n")
    assert "| stale |" not in out
    assert update_document(out) == out
    with pytest.raises(ValueError, match="marker"):
        update_document("no markers here\n")


def test_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "settings.md"
    doc.write_text(f"# Settings\n\n{BEGIN}\n| stale |\n{END}\n")
    assert main(["--check", "--doc", str(doc)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(["--write", "--doc", str(doc)]) == 0
    assert main(["--check", "--doc", str(doc)]) == 0
    assert settings_table() in doc.read_text()


def test_a_queue_smaller_than_max_faces_says_why_and_what_to_set() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        Settings(max_queue=8)  # max_faces defaults to 20
    message = str(info.value)
    assert "FER_MAX_QUEUE (8) is smaller than FER_MAX_FACES (20)" in message
    assert "Set FER_MAX_QUEUE to 20 or more, or FER_MAX_FACES to 8 or less" in message
    assert Settings(max_queue=8, max_faces=8).max_queue == 8
