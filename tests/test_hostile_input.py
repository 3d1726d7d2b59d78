"""Input a real user has and a review found zar mishandling: secrets in URLs, folder and class names
that mean something to Markdown or matplotlib, exceptions with no message (issue 20's defects 1, 2, 7)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from zar import recording
from zar.errors import describe
from zar.tracking.store import redact, redact_text, without_credentials

from helpers import ROOT, TINY, invoke, runs_of

SECRET = "p/a?s#s"  # a generated password: '/', '?' and '#' are common in them
PG = f"postgresql://bob:{SECRET}@127.0.0.1:1/optuna"


# --- secrets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, shown",
    [
        (PG, "postgresql://bob:***@127.0.0.1:1/optuna"),
        ("postgresql+psycopg://u:p%2Fq@db/mlflow", "postgresql+psycopg://u:***@db/mlflow"),
        ("http://alice:a/b@127.0.0.1:5399", "http://alice:***@127.0.0.1:5399"),
        ("http://127.0.0.1:5399", "http://127.0.0.1:5399"),
        ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
        ("/tmp/not-a-url", "/tmp/not-a-url"),
    ],
)
def test_a_url_is_shown_without_its_password_as_sqlalchemy_reads_it(uri, shown):
    assert redact(uri) == shown


def test_a_link_and_a_library_message_drop_the_password_too(monkeypatch):
    assert without_credentials("http://alice:a/b@127.0.0.1:5399/") == "http://127.0.0.1:5399/"
    message = f"(psycopg.OperationalError) connection failed: {PG} refused"
    assert SECRET not in redact_text(message) and "bob:***@127.0.0.1:1" in redact_text(message)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3/cr?t@127.0.0.1:5399")
    assert redact_text("basic auth 's3/cr?t' refused") == "basic auth '***' refused"


def test_a_sweeps_storage_password_is_in_no_message_tag_or_param(store, tmp_path):
    """The storage cannot be opened (nothing listens on port 1): the error, the sweep run's tags and
    params and its zar.error say where, never with the password."""
    result = invoke(
        "sweep", "--models", "resnet", "--space", str(ROOT / "params" / "sweep-space.yaml"), "--trials", "1",
        "--storage", PG, *TINY,
    )  # fmt: skip
    assert result.exit_code != 0
    assert SECRET not in result.output and "bob:***@" in result.output, result.output
    (run,) = runs_of()
    recorded = [*run.data.tags.values(), *run.data.params.values()]
    assert run.info.status == "FAILED" and not [v for v in recorded if SECRET in v]
    assert "bob:***@" in run.data.tags["zar.optuna_storage"]


# --- names that mean something to Markdown and matplotlib ----------------------------------------------


def image_folder(root: Path, classes: list[str], per_class: int = 8) -> Path:
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (16, 16), (40 * i + 3 * j, 90, 200 - 20 * i)).save(root / name / f"{j}.png")
    return root


def test_a_class_named_with_dollars_trains_and_logs_its_confusion_matrix(store, tmp_path):
    """matplotlib read '$1_$' as math text and failed the run after every epoch had trained."""
    data = image_folder(tmp_path / "prices", ["price_$1_$5", "price_$5_$9"])
    result = invoke("train", "--model", "resnet", *TINY, "--data", str(data))
    assert result.exit_code == 0, result.output
    (run,) = runs_of()
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert run.info.status == "FINISHED" and "confusion_matrix.png" in artifacts


def cells(line: str) -> list[str]:
    """A Markdown table row's cells: split on '|' that is not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_a_pipe_in_a_folder_name_stays_in_its_cell_in_compare_and_report(store, tmp_path):
    """Rows split by data are named by the folder: its '|' must not open a cell in either table."""
    for folder in ("a|b", "c"):
        data = image_folder(tmp_path / folder, ["x|y", "z"])
        assert invoke("train", "--model", "resnet", *TINY, "--data", str(data)).exit_code == 0
    table = invoke("compare")
    assert table.exit_code == 0, table.output
    lines = [line for line in table.stdout.splitlines() if line.startswith("|")]
    header, rows = cells(lines[0]), [cells(line) for line in lines[2:]]
    assert len(rows) == 2 and all(len(r) == len(header) for r in rows)
    assert any("a\\|b" in r[0] for r in rows)
    val = header.index("Val Acc (%)")
    assert all(re.fullmatch(r"\d+\.\d\d", r[val]) for r in rows)

    report = invoke("report", "--output", str(tmp_path / "report.html"))
    assert report.exit_code == 0, report.output
    page = (tmp_path / "report.html").read_text()
    first_table = page.split("<table>")[1].split("</table>")[0]
    body = re.findall(r"<tr>(.*?)</tr>", first_table, re.S)
    head = re.findall(r"<th>(.*?)</th>", body[0])
    row_cells = [re.findall(r"<td>(.*?)</td>", r, re.S) for r in body[1:]]
    assert all(len(r) == len(head) for r in row_cells)
    assert all(re.fullmatch(r"\d+\.\d\d", r[head.index("Val Acc (%)")]) for r in row_cells)
    assert any("a|b" in r[0] for r in row_cells)


# --- an exception with nothing to say ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, line",
    [
        (ValueError(""), "ValueError (with no message)"),
        (ValueError("\nthe real reason\nmore"), "ValueError: the real reason"),
        (OSError(28, "No space left on device"), "OSError: [Errno 28] No space left on device"),
    ],
)
def test_an_error_is_one_line_that_says_something(error, line):
    assert describe(error) == line


def test_a_run_failed_by_a_message_less_error_says_so(store, monkeypatch):
    def fail(*args):
        raise ValueError("\n")

    monkeypatch.setattr(recording, "log_results", fail)
    result = invoke("train", "--model", "resnet", *TINY)
    assert result.exit_code == 1 and result.stderr == "Error: ValueError (with no message)\n"
    (run,) = runs_of()
    assert run.info.status == "FAILED" and run.data.tags["zar.error"] == "ValueError (with no message)"
