"""The DICOM tag dock hides patient-identifying tags by default and searches the rest."""

from __future__ import annotations

import pytest

from core.io import read_image
from desktop.tags import DicomTagsWidget, is_identifying


@pytest.fixture(scope="module")
def cbis_tags(cbis_dicoms) -> list[dict]:
    return read_image(min(cbis_dicoms, key=lambda p: p.stat().st_size)).meta["dicom_tags"]


@pytest.fixture
def tags_widget(qtbot):
    widget = DicomTagsWidget()
    qtbot.addWidget(widget)
    return widget


def keywords(widget) -> set[str]:
    return {t["keyword"] for t in widget.visible_tags()}


def test_identifying_tags_hidden_by_default_and_shown_on_request(tags_widget, cbis_tags):
    # The real CBIS-DDSM file carries a patient name and ID ("Mass-Test_P_00820_RIGHT_CC"-like),
    # study dates and UIDs.
    present = {t["keyword"] for t in cbis_tags}
    assert {"PatientName", "PatientID", "StudyDate", "StudyInstanceUID"} <= present
    tags_widget.set_tags(cbis_tags)
    assert not tags_widget.identifying_check.isChecked()
    shown = keywords(tags_widget)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                    "StudyDate", "StudyInstanceUID", "ReferringPhysicianName"):  # fmt: skip
        assert keyword not in shown
    assert {"Modality", "Rows", "Columns", "PhotometricInterpretation", "Laterality"} <= shown
    values = " ".join(t["value"] for t in tags_widget.visible_tags())
    patient = next(t["value"] for t in cbis_tags if t["keyword"] == "PatientName")
    assert patient and patient not in values
    private = [t for t in cbis_tags if int(t["tag"][1:5], 16) % 2 == 1]
    assert private and not any(t in tags_widget.visible_tags() for t in private)

    tags_widget.identifying_check.setChecked(True)
    assert {"PatientName", "PatientID", "StudyDate"} <= keywords(tags_widget)
    assert len(tags_widget.visible_tags()) == len(cbis_tags)


def test_search_matches_name_keyword_tag_and_value(tags_widget, cbis_tags):
    tags_widget.set_tags(cbis_tags)
    tags_widget.search.setText("photometric")
    assert keywords(tags_widget) == {"PhotometricInterpretation"}
    tags_widget.search.setText("(0028,0010)")
    assert keywords(tags_widget) == {"Rows"}
    tags_widget.search.setText("MONOCHROME2")
    assert "PhotometricInterpretation" in keywords(tags_widget)
    # Searching for a hidden tag finds nothing until identifying tags are shown.
    tags_widget.search.setText("PatientName")
    assert keywords(tags_widget) == set()
    tags_widget.identifying_check.setChecked(True)
    assert keywords(tags_widget) == {"PatientName"}


def test_identifying_rule():
    assert is_identifying({"tag": "(0010,0010)", "keyword": "PatientName"})
    assert is_identifying({"tag": "(0008,0080)", "keyword": "InstitutionName"})
    assert is_identifying({"tag": "(0013,1010)", "keyword": ""})  # private
    assert not is_identifying({"tag": "(0020,0020)", "keyword": "PatientOrientation"})
    assert not is_identifying({"tag": "(0028,0010)", "keyword": "Rows"})


def test_non_dicom_image_has_no_tags(tags_widget):
    tags_widget.set_tags([])
    assert tags_widget.visible_tags() == []
