"""The DICOM tag table: searchable, with patient-identifying tags hidden unless asked for.

MammoLab is used in classrooms, where a projected screen must not show who a patient is. The
identifying set follows the attributes the DICOM Basic Application Level Confidentiality
Profile (PS3.15 Annex E) removes or replaces: names, IDs, birth data, addresses and telephone
numbers, accession and study IDs, institutions, physicians and operators, devices, dates and
times, free-text comments and UIDs. Private tags (odd groups) may hold any of these, so they
are hidden too.
"""

from __future__ import annotations

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QTableView,
    QVBoxLayout,
    QWidget,
)

IDENTIFYING_KEYWORDS = frozenset(
    {
        # the patient
        "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs",
        "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName", "PatientBirthDate",
        "PatientBirthTime", "PatientAge", "PatientAddress", "PatientTelephoneNumbers",
        "PatientMotherBirthName", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence",
        "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence",
        "EthnicGroup", "Occupation", "PatientReligiousPreference", "PatientComments",
        "AdditionalPatientHistory", "ResponsiblePerson", "ResponsibleOrganization",
        "PatientState", "PregnancyStatus", "LastMenstrualDate", "SmokingStatus",
        "PersonName", "InsurancePlanIdentification",
        # the visit and the study
        "AccessionNumber", "StudyID", "AdmissionID", "IssuerOfAdmissionID", "VisitComments",
        "RequestAttributesSequence", "RequestedProcedureID", "ScheduledProcedureStepID",
        "PerformedProcedureStepID", "StudyComments", "ImageComments", "StudyDescription",
        "RequestingService", "ReasonForStudy", "CurrentPatientLocation",
        # people and places
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
        "InstitutionCodeSequence", "ReferringPhysicianName", "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
        "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
        "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence",
        "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
        "OperatorsName", "OperatorIdentificationSequence", "RequestingPhysician",
        "ScheduledPerformingPhysicianName", "StationName", "DeviceSerialNumber",
        "PlateID", "CassetteID", "DetectorID", "GantryID", "DeviceUID",
        # dates and times
        "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
        "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime",
        "AcquisitionDateTime", "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate",
        "PerformedProcedureStepEndTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture",
        # identifiers that link an image back to its source
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "MediaStorageSOPInstanceUID",
        "FrameOfReferenceUID", "SynchronizationFrameOfReferenceUID", "ReferencedSOPInstanceUID",
        "IrradiationEventUID", "StorageMediaFileSetUID", "ConcatenationUID",
    }
)  # fmt: skip


def is_identifying(tag: dict) -> bool:
    """Whether a ``meta["dicom_tags"]`` entry may identify a patient (hidden by default)."""
    keyword = str(tag.get("keyword") or "")
    if keyword in IDENTIFYING_KEYWORDS:
        return True
    text = str(tag.get("tag") or "")
    group = text.strip("()").split(",")[0]
    try:
        return int(group, 16) % 2 == 1  # private tags: anything may be in them
    except ValueError:
        return not keyword  # an unnamed tag we cannot place: hide it


def refilter(proxy: QSortFilterProxyModel, change) -> None:
    """Apply ``change()`` to a proxy's filter state and re-filter (Qt >= 6.10 way if present)."""
    if hasattr(proxy, "beginFilterChange"):
        proxy.beginFilterChange()
        change()
        proxy.endFilterChange()
    else:  # Qt < 6.10
        change()
        proxy.invalidateFilter()


# Name and value first: they are what a reader wants in a narrow dock; tag and VR follow.
COLUMNS = ("Name", "Value", "Tag", "VR")
_FIELDS = ("name", "value", "tag", "vr")


class DicomTagModel(QAbstractTableModel):
    """Rows of ``meta["dicom_tags"]`` (dicts with tag, keyword, name, vr, value)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._tags: list[dict] = []

    def set_tags(self, tags: list[dict]) -> None:
        self.beginResetModel()
        self._tags = list(tags or [])
        self.endResetModel()

    def tag(self, row: int) -> dict:
        return self._tags[row]

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        return 0 if parent.isValid() else len(self._tags)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        tag = self._tags[index.row()]
        if role == Qt.ItemDataRole.ToolTipRole:
            return (
                f"{tag.get('tag', '')} {tag.get('keyword', '')} ({tag.get('vr', '')})\n"
                f"{tag.get('value', '')}"
            )
        if role == Qt.ItemDataRole.DisplayRole:
            field = _FIELDS[index.column()]
            value = tag.get(field)
            if field == "name" and not value:
                value = tag.get("keyword") or ""
            return "" if value is None else str(value)
        return None

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None


class _TagFilterModel(QSortFilterProxyModel):
    """Hides identifying tags unless allowed, and keeps rows whose text contains the search."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._show_identifying = False
        self._text = ""

    def set_show_identifying(self, show: bool) -> None:
        refilter(self, lambda: setattr(self, "_show_identifying", bool(show)))

    def set_text(self, text: str) -> None:
        refilter(self, lambda: setattr(self, "_text", text.strip().lower()))

    def filterAcceptsRow(self, row: int, parent: QModelIndex) -> bool:
        model: DicomTagModel = self.sourceModel()
        tag = model.tag(row)
        if not self._show_identifying and is_identifying(tag):
            return False
        if not self._text:
            return True
        haystack = " ".join(
            str(tag.get(k) or "") for k in ("tag", "keyword", "name", "vr", "value")
        )
        return self._text in haystack.lower()


class DicomTagsWidget(QWidget):
    """Search box, the identifying-tags toggle and the tag table."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._model = DicomTagModel(self)
        self._proxy = _TagFilterModel(self)
        self._proxy.setSourceModel(self._model)

        self.search = QLineEdit()
        self.search.setPlaceholderText("Search tags…")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self._on_search_text_changed)
        self.identifying_check = QCheckBox("Show identifying tags")
        self.identifying_check.setToolTip(
            "Patient names, IDs, dates, institutions and the like are hidden by default "
            "so that a projected screen does not show who the patient is."
        )
        self.identifying_check.toggled.connect(self._on_identifying_check_toggled)
        self._count = QLabel("")

        self.table = QTableView()
        self.table.setModel(self._proxy)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().hide()
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        self.table.setColumnWidth(0, 170)
        self.table.setColumnWidth(1, 230)
        self.table.setColumnWidth(2, 95)

        top = QHBoxLayout()
        top.addWidget(self.search, 1)
        top.addWidget(self.identifying_check)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.table, 1)
        layout.addWidget(self._count)
        self._update_count()

    def set_tags(self, tags: list[dict] | None) -> None:
        """Show a data set's tags; ``None`` or empty for images that are not DICOM."""
        self._model.set_tags(tags or [])
        self._update_count()

    def visible_tags(self) -> list[dict]:
        """The tags currently listed (after the identifying filter and the search)."""
        return [
            self._model.tag(self._proxy.mapToSource(self._proxy.index(row, 0)).row())
            for row in range(self._proxy.rowCount())
        ]

    def set_show_identifying(self, show: bool) -> None:
        self.identifying_check.setChecked(show)

    def _on_search_text_changed(self, text: str) -> None:
        self._proxy.set_text(text)
        self._update_count()

    def _on_identifying_check_toggled(self, checked: bool) -> None:
        self._proxy.set_show_identifying(checked)
        self._update_count()

    def _update_count(self) -> None:
        total = self._model.rowCount()
        if total == 0:
            self._count.setText("No DICOM tags (the image is not a DICOM file).")
            return
        hidden = sum(1 for r in range(total) if is_identifying(self._model.tag(r)))
        shown = self._proxy.rowCount()
        note = (
            f"; {hidden} identifying hidden"
            if hidden and not self.identifying_check.isChecked()
            else ""
        )
        self._count.setText(f"{shown} of {total} tags shown{note}")
