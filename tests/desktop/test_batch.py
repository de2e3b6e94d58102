"""Classify Folder: the table fills, bad files become error rows, Cancel stops, Export writes the
CLI's CSV, and nothing is written before the user exports."""

from __future__ import annotations

import csv
import shutil

import pytest
from PySide6.QtCore import Qt

from core.batch import CSV_COLUMNS
from desktop.batch import ERROR_ROWS


@pytest.fixture
def batch_folder(tmp_path, mias_dir, bad_files):
    """Three real films in a nested folder and two files that are not images."""
    folder = tmp_path / "class"
    (folder / "b").mkdir(parents=True)
    for name, target in (("mdb001.png", "a1.png"), ("mdb002.png", "b/b1.png"),
                         ("mdb007.png", "b/b2.png")):  # fmt: skip
        shutil.copy(mias_dir / name, folder / target)
    shutil.copy(bad_files["text"], folder / "a2.png")
    shutil.copy(bad_files["empty"], folder / "b" / "broken.dcm")
    return folder


def snapshot(folder):
    return sorted((p, p.stat().st_size) for p in folder.rglob("*"))


def test_batch_fills_the_table_past_bad_files(make_window, qtbot, analyzer, batch_folder):
    before = snapshot(batch_folder)
    window = make_window(analyzer=analyzer)
    dialog = window.classify_folder(batch_folder)
    with qtbot.waitSignal(dialog.batch_finished, timeout=120000):
        pass
    rows = dialog.rows()
    assert [r.path.relative_to(batch_folder).as_posix() for r in rows] == [
        "a1.png",
        "a2.png",
        "b/b1.png",
        "b/b2.png",
        "b/broken.dcm",
    ]
    status = {r.path.name: r.status for r in rows}
    assert status == {"a1.png": "ok", "a2.png": "error", "b1.png": "ok", "b2.png": "ok",
                      "broken.dcm": "error"}  # fmt: skip
    assert all(r.error for r in rows if r.status == "error")
    assert dialog.progress.value() == 5 and dialog.count_label.text() == "5 / 5, 2 errors"
    model = dialog.model
    first = rows[0]
    assert model.index(0, 1).data() == first.predicted
    assert model.index(0, 2).data() == f"{100 * first.probabilities[0]:.1f} %"
    assert model.index(1, 6).data().startswith("error:")

    dialog.filter_combo.setCurrentText(ERROR_ROWS)
    assert dialog.proxy.rowCount() == 2
    dialog.filter_combo.setCurrentText(first.predicted)
    assert dialog.proxy.rowCount() == sum(r.predicted == first.predicted for r in rows)
    dialog.filter_combo.setCurrentText("All")
    dialog.table.sortByColumn(4, Qt.SortOrder.DescendingOrder)  # Cancer, highest first
    cancers = [dialog.proxy.index(r, 4).data() for r in range(3)]
    assert cancers == sorted(cancers, key=lambda t: float(t.split()[0]), reverse=True)

    assert snapshot(batch_folder) == before  # nothing written without an export

    # Double-click opens the image with its analysis.
    with qtbot.waitSignal(window.analysis_shown, timeout=60000):
        dialog.open_requested.emit(rows[2].path)
    assert window.mammogram.path == rows[2].path


def test_export_writes_the_cli_columns(make_window, qtbot, analyzer, batch_folder, tmp_path):
    window = make_window(analyzer=analyzer)
    dialog = window.classify_folder(batch_folder)
    with qtbot.waitSignal(dialog.batch_finished, timeout=120000):
        pass
    out = tmp_path / "results.csv"
    dialog.export_csv(out)
    with open(out, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        lines = list(reader)
    assert len(lines) == 5
    by_name = {line["path"].rsplit("/", 1)[-1]: line for line in lines}
    ok = by_name["a1.png"]
    row = dialog.rows()[0]
    assert ok["status"] == "ok" and ok["predicted"] == row.predicted
    assert float(ok["p_cancer"]) == pytest.approx(row.probabilities[2], abs=1e-6)
    assert ok["model_version"] == analyzer.version
    assert by_name["a2.png"]["status"] == "error" and by_name["a2.png"]["error"]


def test_cancel_stops_the_run(make_window, qtbot, analyzer, tmp_path, mias_dir):
    folder = tmp_path / "many"
    folder.mkdir()
    films = sorted(mias_dir.glob("mdb*.png"))[:12]
    for film in films:
        shutil.copy(film, folder / film.name)
    window = make_window(analyzer=analyzer)
    dialog = window.classify_folder(folder)
    qtbot.waitUntil(lambda: len(dialog.rows()) >= 1, timeout=60000)
    dialog.cancel_button.click()
    with qtbot.waitSignal(dialog.batch_finished, timeout=60000):
        pass
    done = len(dialog.rows())
    assert 1 <= done < len(films)
    assert "cancelled" in dialog.eta_label.text()
    assert not dialog.is_running() and dialog.export_button.isEnabled()
    qtbot.wait(300)
    assert len(dialog.rows()) == done  # nothing arrives after the cancel


def test_a_new_run_replaces_a_running_one(make_window, qtbot, analyzer, tmp_path, mias_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for film in sorted(mias_dir.glob("mdb*.png"))[:8]:
        shutil.copy(film, first / film.name)
    for film in sorted(mias_dir.glob("mdb*.png"))[8:10]:
        shutil.copy(film, second / film.name)
    window = make_window(analyzer=analyzer)
    dialog = window.classify_folder(first)
    qtbot.waitUntil(lambda: len(dialog.rows()) >= 1, timeout=60000)
    assert window.classify_folder(second) is dialog
    with qtbot.waitSignal(dialog.batch_finished, timeout=60000):
        pass
    qtbot.wait(300)
    assert sorted(r.path.parent for r in dialog.rows()) == [second, second]


def test_batch_reads_pairs_and_says_so(make_window, qtbot, analyzer, mias_dir, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name in ("mdb001.png", "mdb002.png", "mdb007.png"):
        shutil.copy(mias_dir / name, folder / name)
    window = make_window(analyzer=analyzer)
    dialog = window.classify_folder(folder)
    with qtbot.waitSignal(dialog.batch_finished, timeout=120000):
        pass
    assert dialog.count_label.text() == "3 / 3, 2 read beside the other breast"
    by_name = {r.path.name: r for r in dialog.rows()}
    assert by_name["mdb001.png"].other_breast == folder / "mdb002.png"
    assert by_name["mdb007.png"].other_breast is None
    tips = [dialog.model.index(i, 0).data(Qt.ItemDataRole.ToolTipRole) for i in range(3)]
    assert "\nRead beside the other breast: mdb002.png" in tips[0] and "\nRead alone" in tips[2]


def test_nothing_is_lost_without_asking(make_window, qtbot, analyzer, tmp_path, mias_dir):
    """Quitting, or starting another folder, with a batch running or not exported asks first;
    Cancel keeps everything; after an export nothing is asked."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for film in sorted(mias_dir.glob("mdb*.png"))[:6]:
        shutil.copy(film, first / film.name)
    shutil.copy(mias_dir / "mdb010.png", second / "mdb010.png")
    window = make_window(analyzer=analyzer)
    asked = []
    answer = [False]
    window.confirm = lambda title, question: asked.append((title, question)) or answer[0]
    dialog = window.classify_folder(first)
    qtbot.waitUntil(lambda: len(dialog.rows()) >= 1, timeout=60000)
    assert window.classify_folder(second) is None  # declined: the first run goes on
    assert asked[-1][0] == "Classify Folder" and "A folder batch is running (" in asked[-1][1]
    assert not window.close() and window.isVisible()  # declined: still running, still here
    assert asked[-1][0] == "Quit MammoLab" and asked[-1][1].endswith("Quit and discard its results?")
    with qtbot.waitSignal(dialog.batch_finished, timeout=120000):
        pass
    assert len(dialog.rows()) == 6
    assert not window.close()
    assert asked[-1][1].startswith("The folder batch's 6 rows have not been exported")
    dialog.export_csv(tmp_path / "out.csv")
    n = len(asked)
    answer[0] = True
    assert window.close() and len(asked) == n  # exported: closes without a question


def test_a_call_other_than_the_largest_probability_is_explained(qtbot, tmp_path):
    from pathlib import Path

    from core.batch import BatchRow
    from desktop.batch import BatchDialog

    dialog = BatchDialog()
    qtbot.addWidget(dialog)
    model = dialog.model
    model.set_root(tmp_path)
    model.append(BatchRow(path=tmp_path / "a.png", status="ok", predicted="Benign",
                          probabilities=(0.557, 0.300, 0.143), other_breast=Path("b.png")))
    model.append(BatchRow(path=tmp_path / "c.png", status="ok", predicted="Normal",
                          probabilities=(0.8, 0.1, 0.1)))
    model.append(BatchRow(path=tmp_path / "bad.png", status="error", error="bad.png: file not found"))
    assert model.data(model.index(2, 6)) == "error: file not found"  # the File column names it
    tip = Qt.ItemDataRole.ToolTipRole
    assert model.data(model.index(0, 1), tip).endswith(
        "Normal is more probable, but Benign stands higher against how common it was among the "
        "training films.")
    assert "more probable" not in model.data(model.index(1, 1), tip)
    assert "differ from the largest probability" in model.headerData(1, Qt.Orientation.Horizontal, tip)
    assert any("not for diagnosis" in label.text() for label in dialog.findChildren(type(dialog._folder_label)))
