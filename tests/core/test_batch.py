"""core.batch and `mammolab classify` on real files: every file a row, bad files never stop a run."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest

from core.batch import CSV_COLUMNS, classify_files, find_images, write_csv
from core.cli import main


@pytest.fixture()
def mixed_folder(tmp_path, mias_dir, cbis_dicoms):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    shutil.copy(mias_dir / "mdb001.png", d / "a.PNG")
    shutil.copy(cbis_dicoms[0], d / "sub" / "scan_without_extension")  # DICM preamble
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "notes.txt").write_text("not an image")
    (d / "table.xlsx").write_bytes(b"PK\x03\x04")
    return d


def run_all(gen):
    """Every row of a classify_files generator, and the summary it returns."""
    rows = []
    try:
        while True:
            rows.append(next(gen))
    except StopIteration as stop:
        return rows, stop.value


def test_find_images_by_extension_and_preamble(mixed_folder):
    files, skipped = find_images([mixed_folder])
    names = sorted(f.name for f in files)
    assert names == ["a.PNG", "broken.png", "scan_without_extension"]
    assert skipped == 2


def test_classify_files_continues_past_bad_files(analyzer, mixed_folder, tmp_path):
    files, skipped = find_images([mixed_folder])
    rows, summary = run_all(classify_files(analyzer, files, masks_dir=tmp_path / "masks", skipped=skipped))
    assert [r.index for r in rows] == [1, 2, 3]
    by_name = {r.path.name: r for r in rows}
    assert by_name["broken.png"].status == "error" and "broken.png" in by_name["broken.png"].error
    assert by_name["a.PNG"].status == "ok" and by_name["scan_without_extension"].status == "ok"
    assert summary.ok == 2 and summary.failed == 1 and summary.skipped == 2
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [
        "a_mask.png", "scan_without_extension_mask.png"]


def test_cancel_by_closing_the_generator(analyzer, mixed_folder):
    files, _ = find_images([mixed_folder])
    gen = classify_files(analyzer, files)
    first = next(gen)
    gen.close()
    assert first.index == 1
    with pytest.raises(StopIteration):
        next(gen)


def test_cli_classify_writes_exact_columns(mixed_folder, tmp_path, capsys):
    out = tmp_path / "out.csv"
    code = main(["classify", str(mixed_folder), "--csv", str(out), "-q"])
    assert code == 1  # one file failed
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 3
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2
    for r in ok:
        p = [float(r[k]) for k in ("p_normal", "p_benign", "p_cancer")]
        assert abs(sum(p) - 1) < 1e-4 and r["predicted"] in ("Normal", "Benign", "Cancer")
        assert r["model_version"]
    bad = [r for r in rows if r["status"] == "error"][0]
    assert bad["error"] and bad["p_normal"] == ""
    assert "2 ok, 1 failed" in capsys.readouterr().err


def test_cli_progress_into_a_log_is_one_line_a_file(mixed_folder, tmp_path, capsys):
    """Piped or logged (not a terminal), progress is a line per file naming it, with the error of
    a file that failed, and no carriage returns that would fold it all into one line."""
    main(["classify", str(mixed_folder), "--csv", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert [ln.split()[0] for ln in lines] == ["[1/3]", "[2/3]", "[3/3]"]
    (bad,) = [ln for ln in lines if " error " in ln]
    assert bad.count("broken.png") == 1 and bad.split("broken.png", 1)[1].startswith(": ")
    assert sum(" ok " in ln for ln in lines) == 2


def test_cli_named_file_always_attempted(tmp_path, capsys):
    odd = tmp_path / "named.txt"
    odd.write_text("hello")
    out = tmp_path / "o.csv"
    assert main(["classify", str(odd), "--csv", str(out), "-q"]) == 1
    rows = list(csv.DictReader(open(out, newline="")))
    assert rows[0]["status"] == "error" and "named.txt" in rows[0]["error"]


def test_cli_all_ok_exit_zero(mias_dir, tmp_path):
    out = tmp_path / "o.csv"
    assert main(["classify", str(mias_dir / "mdb001.png"), str(mias_dir / "mdb002.png"),
                 "--csv", str(out), "-q"]) == 0


def test_cli_usage_and_model_errors_exit_two(tmp_path, capsys):
    assert main(["classify", str(tmp_path), "--csv", str(tmp_path / "o.csv"),
                 "--model", str(tmp_path / "nowhere")]) == 2
    assert "not a model bundle" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["classify", str(empty), "--csv", str(tmp_path / "o.csv")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["classify", str(empty)])  # --csv missing
    assert exc.value.code == 2
    assert not (tmp_path / "o.csv").exists(), "a refused run writes nothing"


def test_write_csv_roundtrip(tmp_path):
    from pathlib import Path

    from core.batch import BatchRow

    rows = [BatchRow(Path("x.png"), "ok", predicted="Benign", probabilities=(0.1, 0.6, 0.3),
                     lesion_area_frac=0.01, model_version="1.0.0")]
    p = write_csv(rows, tmp_path / "r.csv")
    got = list(csv.DictReader(open(p, newline="")))
    assert got[0]["p_benign"] == "0.600000" and got[0]["predicted"] == "Benign"


def test_classify_on_all_cbis_dicoms_without_tensorflow(cbis_dicoms, tmp_path):
    out = tmp_path / "d.csv"
    code = (
        "import sys\n"
        "from core.cli import main\n"
        f"rc = main(['classify', *{[str(p) for p in cbis_dicoms]!r}, '--csv', {str(out)!r}, '-q'])\n"
        "assert rc == 0, rc\n"
        "bad = [m for m in ('tensorflow', 'keras', 'PySide6') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    rows = list(csv.DictReader(open(out, newline="")))
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)


def test_cli_damaged_dicom_gets_mammolabs_error_and_no_library_warning(cbis_dicoms, tmp_path):
    """pydicom notes a cut-off file as a Python warning and a log line; on the command line the
    user sees MammoLab's row for it and nothing of pydicom's (run as a user would, in a fresh
    process, since pytest captures warnings itself)."""
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(cbis_dicoms[0].read_bytes()[:5000])  # inside the encapsulated pixel data
    out = tmp_path / "d.csv"
    done = subprocess.run([sys.executable, "-m", "core.cli", "classify", str(cut), "--csv", str(out), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Warning" not in done.stderr and "pydicom" not in done.stderr, done.stderr
    (row,) = list(csv.DictReader(open(out, newline="")))
    assert row["status"] == "error" and row["error"].startswith("cut.dcm: the DICOM file is damaged")


@pytest.fixture()
def pair_folder(tmp_path, mias_dir):
    """Both films of MIAS woman 1 (mdb001/002), mdb007 without its mdb008, and mdb009 beside a
    broken mdb010 (its other breast)."""
    d = tmp_path / "pairs"
    d.mkdir()
    for name in ("mdb001.png", "mdb002.png", "mdb007.png"):
        shutil.copy(mias_dir / name, d / name)
    shutil.copy(mias_dir / "mdb009.png", d / "mdb009.png")
    (d / "mdb010.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return d


def test_classify_reads_pairs_beside_each_other(analyzer, pair_folder):
    from core.io import read_image

    assert analyzer.reads_pairs
    files, _ = find_images([pair_folder])
    rows, summary = run_all(classify_files(analyzer, files))
    by_name = {r.path.name: r for r in rows}
    assert [r.index for r in rows] == [1, 2, 3, 4, 5]
    assert [r.path for r in rows] == files  # file order, though partners are analysed together
    assert by_name["mdb001.png"].other_breast == pair_folder / "mdb002.png"
    assert by_name["mdb002.png"].other_breast == pair_folder / "mdb001.png"
    a = analyzer.analyze(read_image(pair_folder / "mdb001.png"))
    b = analyzer.analyze(read_image(pair_folder / "mdb002.png"))
    np.testing.assert_allclose(by_name["mdb001.png"].probabilities, analyzer.compare(a, b), atol=1e-6)
    np.testing.assert_allclose(by_name["mdb002.png"].probabilities, analyzer.compare(b, a), atol=1e-6)
    assert by_name["mdb001.png"].predicted == analyzer.call_pair(analyzer.compare(a, b))
    np.testing.assert_allclose(by_name["mdb001.png"].single_probabilities, a.probabilities, atol=1e-6)
    # The bilateral reading differs from the single-film one (else this test proves nothing).
    assert np.abs(np.array(by_name["mdb001.png"].probabilities) - a.probabilities).max() > 1e-3
    # No partner (mdb007's mdb008 is absent) or a partner that fails: the single-film reading.
    alone = analyzer.analyze(read_image(pair_folder / "mdb007.png"))
    np.testing.assert_allclose(by_name["mdb007.png"].probabilities, alone.probabilities, atol=1e-6)
    assert by_name["mdb007.png"].other_breast is None
    nine = analyzer.analyze(read_image(pair_folder / "mdb009.png"))
    np.testing.assert_allclose(by_name["mdb009.png"].probabilities, nine.probabilities, atol=1e-6)
    assert by_name["mdb009.png"].other_breast is None and by_name["mdb010.png"].status == "error"
    assert summary.paired == 2 and summary.ok == 4 and summary.failed == 1

    single = list(classify_files(analyzer, files, pair=False))
    np.testing.assert_allclose(single[0].probabilities, a.probabilities, atol=1e-6)
    assert all(r.other_breast is None for r in single)


def test_a_failing_pair_reading_keeps_both_single_readings(analyzer, pair_folder, monkeypatch):
    files, _ = find_images([pair_folder])

    def broken(film, other):
        raise RuntimeError("bilateral model broke")

    monkeypatch.setattr(analyzer, "compare", broken)
    rows = list(classify_files(analyzer, files))
    assert len(rows) == 5 and all(r.other_breast is None for r in rows)
    assert all(r.probabilities == r.single_probabilities for r in rows if r.status == "ok")


def test_pairs_and_films_alone_are_called_by_their_stages_class_priors(
        analyzer, bundle_dir, pair_folder, tmp_path):
    from core.inference import Analyzer
    from tests.conftest import edited_bundle

    files, _ = find_images([pair_folder])
    first = next(r for r in classify_files(analyzer, files) if r.path.name == "mdb001.png")
    p = np.array(first.probabilities)
    top = int(np.argmax(p))
    prior = np.full(3, 0.01)
    prior[top] = 0.98  # the most probable class made very common: the call moves off it
    folder = edited_bundle(bundle_dir, tmp_path / "bundle",
                           lambda card: card["pipeline"]["bilateral"].update(class_prior=prior.tolist()))
    rows = {r.path.name: r for r in classify_files(Analyzer.from_bundle(folder), files)}
    want = int(np.argmax(p / prior))
    assert want != top  # else this test proves nothing
    np.testing.assert_allclose(rows["mdb001.png"].probabilities, p, atol=1e-6)  # bars unchanged
    assert rows["mdb001.png"].predicted == analyzer.classes[want]
    alone = rows["mdb007.png"]  # no partner: the single-film stage's call (arg-max without it)
    assert alone.other_breast is None
    from core.decision import decide
    assert alone.predicted == analyzer.classes[decide(np.array(alone.probabilities), analyzer.single_prior)]


def test_cli_says_how_many_films_were_paired(pair_folder, tmp_path, capsys):
    out, pairs = tmp_path / "p.csv", tmp_path / "pairs.csv"
    assert main(["classify", str(pair_folder), "--csv", str(out), "-q", "--pairs", str(pairs)]) == 1
    assert "2 read beside the other breast" in capsys.readouterr().err
    header = open(out, newline="").readline().strip()
    assert header == ",".join(CSV_COLUMNS)
    main_rows = {r["path"]: r for r in csv.DictReader(open(out, newline=""))}
    side = {r["path"]: r for r in csv.DictReader(open(pairs, newline=""))}
    assert len(side) == 4  # the broken film has no row there
    first = str(pair_folder / "mdb001.png")
    assert side[first]["other_breast"] == str(pair_folder / "mdb002.png")
    assert side[str(pair_folder / "mdb007.png")]["other_breast"] == ""
    assert side[first]["p_cancer_alone"] != main_rows[first]["p_cancer"]
    seven = str(pair_folder / "mdb007.png")
    assert side[seven]["p_cancer_alone"] == main_rows[seven]["p_cancer"]
    assert main(["classify", str(pair_folder), "--csv", str(out), "--pairs", str(out)]) == 2
    assert "other than the --csv file" in capsys.readouterr().err
    assert main(["classify", str(pair_folder), "--csv", str(out), "-q", "--no-pair"]) == 1
    assert "beside" not in capsys.readouterr().err


def test_cli_never_writes_over_an_image_it_classifies(tmp_path, mias_dir, capsys):
    """--csv or --pairs naming an input image, or --masks naming a file, is refused before any
    work; a mask never takes the name of an input image in the same folder."""
    d = tmp_path / "in"
    d.mkdir()
    film = d / "mdb001.png"
    shutil.copy(mias_dir / "mdb001.png", film)
    lookalike = d / "mdb001_mask.png"  # an input whose name is the mask's
    shutil.copy(mias_dir / "mdb002.png", lookalike)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for args, said in [(["--csv", str(film)], "--csv"),
                       (["--csv", str(tmp_path / "o.csv"), "--pairs", str(film)], "--pairs"),
                       (["--csv", str(tmp_path / "o.csv"), "--masks", str(film)], "--masks")]:
        assert main(["classify", str(d), *args, "-q"]) == 2
        err = capsys.readouterr().err
        assert said in err and ("is one of the images" in err or "is a file" in err), err
    assert main(["classify", str(d), "--csv", str(tmp_path / "o.csv"), "--masks", str(d), "-q"]) == 0
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name in before} == before
    assert sorted(p.name for p in d.iterdir()) == [
        "mdb001.png", "mdb001_mask.png", "mdb001_mask_2.png", "mdb001_mask_mask.png"]
