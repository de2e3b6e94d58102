"""core.io: real CBIS-DDSM DICOMs, MIAS PNGs and Mini-DDSM JPEGs, plus synthetic files written
here for what the real files do not cover (windows, MONOCHROME1, compression, broken files)."""

from __future__ import annotations

import io
import pickle
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_encoder
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from core.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    Mammogram,
    has_dicom_preamble,
    laterality_view_from_name,
    read_image,
)

CBIS_VIEWS = {"rcc": ("R", "CC"), "lcc": ("L", "CC"), "rmlo": ("R", "MLO"), "lmlo": ("L", "MLO")}


# --- helpers ---------------------------------------------------------------------------------


def make_dicom(
    arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **tags
) -> Dataset:
    """A minimal secondary-capture data set holding `arr`, with extra tags by keyword."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "MG"
    ds.set_pixel_data(arr, photometric, bits_stored or 8 * arr.dtype.itemsize)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom(path: Path, arr: np.ndarray, **kwargs) -> Path:
    return save(make_dicom(arr, **kwargs), path)


def ramp12(rows: int = 16, cols: int = 32) -> np.ndarray:
    """A 12-bit ramp that never reaches 4095, so full-range scaling differs from max scaling."""
    return (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) * 7) % 3000


def expect_error(path: Path, *words: str) -> str:
    """read_image fails with an ImageReadError naming the file and containing `words`."""
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(f"{path.name}: "), message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def pydicom_file(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(found)


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


# --- real CBIS-DDSM DICOMs -------------------------------------------------------------------


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("view", sorted(CBIS_VIEWS))
def test_cbis_dicom_reads_at_full_resolution(cbis_cases, case, view):
    path = cbis_cases[case][view]
    ds = pydicom.dcmread(path)
    m = read_image(path)

    assert isinstance(m, Mammogram) and m.path == path
    assert m.pixels.shape == (ds.Rows, ds.Columns)
    assert m.pixels.dtype == np.float32
    assert 0.0 <= m.pixels.min() and m.pixels.max() <= 1.0
    assert m.pixels.std() > 0.05  # a mammogram, not a flat field
    assert np.array_equal(m.raw, ds.pixel_array)  # RLE decoded to the stored integers
    # 16 bits stored, no window: the full range 0..65535, not the image's own maximum.
    assert m.pixels.max() == np.float32(int(m.raw.max()) / 65535)
    r, c = ds.Rows // 2, ds.Columns // 3
    assert m.pixels[r, c] == np.float32(int(m.raw[r, c]) / 65535)

    assert (m.meta["laterality"], m.meta["view"]) == CBIS_VIEWS[view]
    assert m.meta["laterality"] == ds.Laterality
    assert m.meta["view"] == ds.PatientOrientation  # CBIS writes the view there
    assert m.meta["format"] == "DICOM"
    assert (m.meta["width"], m.meta["height"]) == (ds.Columns, ds.Rows)
    assert m.meta["bits_stored"] == 16
    assert m.meta["frames"] == 1
    assert m.meta["photometric"] == "MONOCHROME2"
    assert m.meta["transfer_syntax"] == "RLE Lossless"
    assert m.meta["window"] is None and m.meta["windows"] == []
    assert m.meta["pixel_spacing_mm"] is None  # CBIS-DDSM secondary captures carry none


def test_cbis_dicom_tags_for_display(cbis_dicoms):
    m = read_image(cbis_dicoms[0])
    tags = m.meta["dicom_tags"]
    by_tag = {t["tag"]: t for t in tags}
    assert all(set(t) == {"tag", "keyword", "name", "vr", "value"} for t in tags)
    assert all(isinstance(t["value"], str) and len(t["value"]) <= 120 for t in tags)
    assert "(7FE0,0010)" not in by_tag
    assert by_tag["(0010,0020)"]["keyword"] == "PatientID"
    assert by_tag["(0010,0020)"]["value"] == "Mass-Test_P_00173_RIGHT_CC"
    assert by_tag["(0002,0010)"]["value"] == RLELossless
    assert by_tag["(0028,0010)"] == {
        "tag": "(0028,0010)",
        "keyword": "Rows",
        "name": "Rows",
        "vr": "US",
        "value": "4560",
    }
    assert by_tag["(0013,1010)"]["value"] == "CBIS-DDSM"  # a private tag shown as text


def test_cbis_files_have_the_dicom_preamble(cbis_dicoms):
    assert all(has_dicom_preamble(p) for p in cbis_dicoms)


# --- real MIAS and Mini-DDSM files -----------------------------------------------------------


def test_mias_png_exact_values(mias_dir):
    path = mias_dir / "mdb001.png"
    expected = np.asarray(Image.open(path))
    m = read_image(path)
    assert m.pixels.shape == (1024, 1024) and m.pixels.dtype == np.float32
    assert m.raw.dtype == np.uint8 and np.array_equal(m.raw, expected)
    for r, c in [(0, 0), (512, 512), (300, 700), (1023, 1023), (600, 100)]:
        assert m.pixels[r, c] == np.float32(int(expected[r, c]) / 255)
    assert m.pixels.max() > 0.5 and m.pixels.std() > 0.05
    assert m.meta["format"] == "PNG" and m.meta["bits_stored"] == 8
    assert (m.meta["width"], m.meta["height"]) == (1024, 1024)
    assert (m.meta["laterality"], m.meta["view"]) == (None, None)
    assert not has_dicom_preamble(path)


def test_miniddsm_jpeg(miniddsm_dir):
    path = miniddsm_dir / "Benign" / "0029" / "C_0029_1.LEFT_CC.jpg"
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("L"))
    m = read_image(path)
    assert m.pixels.shape == expected.shape
    assert np.array_equal(m.raw, expected)
    assert m.pixels[1000, 600] == np.float32(int(expected[1000, 600]) / 255)
    assert m.pixels.std() > 0.05
    assert m.meta["format"] == "JPEG"
    assert (m.meta["laterality"], m.meta["view"]) == ("L", "CC")


def test_miniddsm_views_from_names(miniddsm_dir):
    images = [p for p in miniddsm_dir.glob("*/*/*.jpg") if "mask" not in p.name.lower()]
    assert len(images) >= 20
    for path in images:
        side = "L" if ".LEFT_" in path.name else "R"
        view = "CC" if path.name.endswith("_CC.jpg") else "MLO"
        assert laterality_view_from_name(path) == (side, view), path.name


# --- DICOM grey-scale chain (synthetic) ------------------------------------------------------


def test_monochrome1_is_exactly_one_minus_monochrome2(tmp_path):
    arr = ramp12()
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", arr, bits_stored=12))
    m1 = read_image(
        write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1", bits_stored=12)
    )
    assert np.array_equal(m1.raw, m2.raw)
    assert np.array_equal(m1.pixels, np.float32(1) - m2.pixels)
    assert m1.meta["inverted"] and not m2.meta["inverted"]
    assert m1.meta["photometric"] == "MONOCHROME1"


def test_presentation_lut_shape_inverse_inverts(tmp_path):
    arr = ramp12()
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", arr, bits_stored=12))
    inverse = read_image(
        write_dicom(tmp_path / "inv.dcm", arr, bits_stored=12, PresentationLUTShape="INVERSE")
    )
    assert np.array_equal(inverse.pixels, np.float32(1) - m2.pixels)


def test_no_window_uses_full_stored_range_not_image_max(tmp_path):
    arr = ramp12()  # max 2999 < 4095
    m = read_image(write_dicom(tmp_path / "x.dcm", arr, bits_stored=12))
    assert m.meta["voi"] == "full stored range"
    np.testing.assert_allclose(m.pixels, arr / 4095, atol=1e-7)
    assert m.pixels.max() < 0.75


def test_signed_full_range(tmp_path):
    arr = np.array([[-2048, -1, 0], [1, 1000, 2047]], dtype=np.int16)
    m = read_image(write_dicom(tmp_path / "s.dcm", arr, bits_stored=12))
    assert np.array_equal(m.raw, arr)
    np.testing.assert_allclose(m.pixels, (arr + 2048) / 4095, atol=1e-7)


def test_rescale_slope_intercept(tmp_path):
    arr = ramp12()
    path = write_dicom(
        tmp_path / "r.dcm", arr, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100
    )
    m = read_image(path)
    assert np.array_equal(m.raw, arr.astype(np.int64) * 2 - 100)
    # Full stored range through the rescale: -100 .. 8090, a linear map of 0 .. 4095.
    np.testing.assert_allclose(m.pixels, arr / 4095, atol=1e-6)


def test_a_window_keeps_the_grey_direction_of_a_negative_rescale_slope(tmp_path):
    """pydicom's window output runs from the image of the lowest stored value to that of the
    highest, which falls with a negative slope: the window read the film as a negative."""
    arr = ramp12()
    tags = dict(bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095)
    plain = read_image(write_dicom(tmp_path / "n.dcm", arr, **tags))
    windowed = read_image(write_dicom(tmp_path / "nw.dcm", arr, WindowCenter=2048,
                                      WindowWidth=4096, **tags))
    assert np.array_equal(plain.raw, 4095 - arr.astype(np.int64))
    np.testing.assert_allclose(plain.pixels, (4095 - arr) / 4095, atol=1e-6)  # denser: brighter
    np.testing.assert_allclose(windowed.pixels, plain.pixels, atol=2e-3)  # a neutral window
    assert plain.meta["stored_range"] == (0.0, 4095.0)


def test_stored_range_is_what_raw_can_hold(tmp_path):
    arr = np.array([[-2000, 0, 2000]], dtype=np.int16)
    signed = read_image(write_dicom(tmp_path / "s.dcm", arr, bits_stored=16))
    assert signed.meta["stored_range"] == (-32768.0, 32767.0)
    assert signed.meta["window_function"] == "LINEAR"
    rescaled = read_image(write_dicom(tmp_path / "r.dcm", ramp12(), bits_stored=12,
                                      RescaleSlope=2, RescaleIntercept=-100))
    assert rescaled.meta["stored_range"] == (-100.0, 8090.0)


def test_linear_window_known_values(tmp_path):
    arr = np.array([[0, 900, 950, 1000, 1100, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", arr, bits_stored=12, WindowCenter=1000, WindowWidth=200)
    m = read_image(path)
    p = m.pixels[0]
    assert p[0] == 0.0 and p[1] == 0.0  # at or below the lower edge
    assert p[4] == 1.0 and p[5] == 1.0  # above the upper edge
    assert p[3] == pytest.approx(0.5, abs=0.01)  # the centre
    assert p[2] == pytest.approx((950 - 999.5) / 199 + 0.5, abs=1e-6)  # PS3.3 C.11.2.1.2.1
    assert m.meta["window"] == (1000.0, 200.0)
    assert m.meta["voi"] == "window (linear)"


def test_window_is_applied_after_the_rescale(tmp_path):
    # Stored 1064 is 40 after the rescale: the centre of a (40, 400) window.
    arr = np.array([[1064, 824, 1304, 0]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "ct.dcm",
        arr,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    m = read_image(path)
    assert list(m.raw[0]) == [40, -200, 280, -1024]
    assert m.pixels[0, 0] == pytest.approx(0.5, abs=0.01)
    assert m.pixels[0, 1] == 0.0 and m.pixels[0, 2] == 1.0 and m.pixels[0, 3] == 0.0


def test_first_of_several_windows(tmp_path):
    arr = np.array([[1000, 3000]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "ww.dcm",
        arr,
        bits_stored=12,
        WindowCenter=[1000, 3000],
        WindowWidth=[200, 400],
        WindowCenterWidthExplanation=["SOFT", "HARD"],
    )
    m = read_image(path)
    assert m.meta["windows"] == [(1000.0, 200.0, "SOFT"), (3000.0, 400.0, "HARD")]
    assert m.meta["window"] == (1000.0, 200.0)
    assert m.pixels[0, 0] == pytest.approx(0.5, abs=0.01) and m.pixels[0, 1] == 1.0


def test_sigmoid_window(tmp_path):
    arr = np.array([[0, 1548, 2048, 2548, 4095]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "sig.dcm",
        arr,
        bits_stored=12,
        WindowCenter=2048,
        WindowWidth=1000,
        VOILUTFunction="SIGMOID",
    )
    m = read_image(path)
    expected = 1 / (1 + np.exp(-4 * (arr[0] - 2048.0) / 1000))  # PS3.3 C.11.2.1.3.1
    np.testing.assert_allclose(m.pixels[0], expected, atol=1e-6)
    assert m.pixels[0, 2] == 0.5
    assert m.meta["voi"] == "window (sigmoid)"


def test_voi_lut_sequence(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 16])
    item.add_new("LUTData", "US", [(255 - i) * 100 for i in range(256)])  # a reversing LUT
    ds = make_dicom(arr)
    ds.VOILUTSequence = [item]
    m = read_image(save(ds, tmp_path / "lut.dcm"))
    np.testing.assert_allclose(m.pixels, (255 - arr) / 255, atol=1e-7)
    assert m.meta["voi"] == "VOI LUT"


def test_invalid_window_falls_back_to_full_range(tmp_path):
    arr = ramp12()
    path = write_dicom(tmp_path / "bad.dcm", arr, bits_stored=12, WindowCenter=100, WindowWidth=0)
    m = read_image(path)
    assert m.meta["voi"] == "full stored range"
    np.testing.assert_allclose(m.pixels, arr / 4095, atol=1e-7)


def test_table_chain_matches_pydicom_on_the_whole_image():
    """The lookup-table chain gives what pydicom's functions give on the full array."""
    path = pydicom_file("MR_small.dcm")  # signed 16-bit with a window
    ds = pydicom.dcmread(path)
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    expected = (voi + 32768) / 65535  # pydicom's window output spans the stored range
    m = read_image(path)
    np.testing.assert_allclose(m.pixels, expected, atol=1e-6)
    assert m.meta["window"] is not None


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bits=st.integers(8, 16),
    seed=st.integers(0, 2**16),
    slope=st.sampled_from([1.0, 0.5, 2.0, 3.5]),
    intercept=st.integers(-2000, 2000),
    centre=st.floats(-3000, 70000),
    width=st.floats(1, 70000),
    sigmoid=st.booleans(),
)
def test_any_window_gives_unit_range_and_exact_inversion(
    bits, seed, slope, intercept, centre, width, sigmoid
):
    arr = np.random.default_rng(seed).integers(0, 2**bits, (5, 7)).astype(np.uint16)
    tags = dict(RescaleSlope=slope, RescaleIntercept=intercept, WindowCenter=centre)
    tags.update(WindowWidth=width, VOILUTFunction="SIGMOID" if sigmoid else "LINEAR")
    with tempfile.TemporaryDirectory() as folder:
        m2 = read_image(write_dicom(Path(folder) / "a.dcm", arr, bits_stored=bits, **tags))
        m1 = read_image(
            write_dicom(
                Path(folder) / "b.dcm", arr, photometric="MONOCHROME1", bits_stored=bits, **tags
            )
        )
    assert m2.pixels.dtype == np.float32 and m2.pixels.shape == arr.shape
    assert np.isfinite(m2.pixels).all()
    assert 0.0 <= m2.pixels.min() and m2.pixels.max() <= 1.0
    assert np.array_equal(m1.pixels, np.float32(1) - m2.pixels)


# --- DICOM encodings, frames, metadata -------------------------------------------------------


def test_jpeg2000_lossless_round_trip(tmp_path):
    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder (pylibjpeg-openjpeg)")
    arr = np.random.default_rng(1).integers(0, 4096, (64, 48)).astype(np.uint16)
    ds = make_dicom(arr, bits_stored=12)
    ds.compress(JPEG2000Lossless, arr)
    m = read_image(save(ds, tmp_path / "j2k.dcm"))
    assert np.array_equal(m.raw, arr)
    assert "JPEG 2000" in m.meta["transfer_syntax"]


def test_jpeg_baseline_decodes_like_pillow(tmp_path):
    grey = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8) * 2
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "JPEG", quality=90)
    ds = make_dicom(grey)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    m = read_image(save(ds, tmp_path / "jpeg.dcm"))
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.int16)
    assert m.raw.shape == grey.shape
    assert np.abs(m.raw.astype(np.int16) - expected).max() <= 2  # two JPEG decoders' IDCTs
    assert m.meta["transfer_syntax"] == "JPEG Baseline (Process 1)"


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_transfer_syntaxes_decode_to_the_same_values(name):
    reference = read_image(pydicom_file("MR_small.dcm"))
    m = read_image(pydicom_file(name))
    assert np.array_equal(m.raw, reference.raw)
    assert np.array_equal(m.pixels, reference.pixels)


def test_jpeg_extended_12_bit():
    path = pydicom_file("JPGExtended.dcm")
    m = read_image(path)
    assert m.pixels.shape == (1024, 256) and m.meta["bits_stored"] == 12
    assert np.array_equal(m.raw, pydicom.dcmread(path).pixel_array)
    # This file only uses 0..264 of its 12 bits; without a window it stays that dark.
    assert m.raw.max() == 264 and m.pixels.max() == np.float32(264 / 4095)


@pytest.mark.parametrize("syntax", [None, RLELossless])
def test_multiframe_reads_first_frame(tmp_path, syntax):
    frames = np.random.default_rng(2).integers(0, 4096, (3, 20, 30)).astype(np.uint16)
    ds = make_dicom(frames, bits_stored=12)
    if syntax is not None:
        ds.compress(syntax, frames)
    m = read_image(save(ds, tmp_path / "multi.dcm"))
    assert m.meta["frames"] == 3
    assert m.pixels.shape == (20, 30)
    assert np.array_equal(m.raw, frames[0])


def test_file_without_preamble(tmp_path):
    arr = ramp12()
    full = write_dicom(tmp_path / "full.dcm", arr, bits_stored=12)
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(full.read_bytes()[132:])  # drop the preamble and "DICM"
    assert not has_dicom_preamble(bare)
    m = read_image(bare)
    assert np.array_equal(m.raw, arr)
    assert np.array_equal(m.pixels, read_image(full).pixels)


def test_data_set_without_file_meta(tmp_path):
    ds = make_dicom(ramp12(), bits_stored=12)
    del ds.file_meta
    path = tmp_path / "implicit"  # no extension either: the content decides
    ds.save_as(path, implicit_vr=True, little_endian=True)
    m = read_image(path)
    assert np.array_equal(m.raw, ramp12())
    assert m.meta["transfer_syntax"] == "Implicit VR Little Endian"


def test_laterality_and_view_tags_take_precedence(tmp_path):
    code = Dataset()
    code.CodeMeaning = "cranio-caudal"
    path = write_dicom(
        tmp_path / "Calc_RIGHT_MLO.dcm",
        ramp12(),
        ImageLaterality="L",
        Laterality="R",
        ViewCodeSequence=[code],
        PatientID="Mass-Test_P_00173_RIGHT_MLO",
    )
    assert (read_image(path).meta["laterality"], read_image(path).meta["view"]) == ("L", "CC")
    path = write_dicom(tmp_path / "b.dcm", ramp12(), Laterality="R", ViewPosition="MLO")
    assert (read_image(path).meta["laterality"], read_image(path).meta["view"]) == ("R", "MLO")


def test_laterality_and_view_from_identifiers_and_names(tmp_path):
    path = write_dicom(tmp_path / "1-1.dcm", ramp12(), PatientID="Calc-Training_P_00005_RIGHT_MLO")
    m = read_image(path)
    assert (m.meta["laterality"], m.meta["view"]) == ("R", "MLO")
    folder = tmp_path / "Mass-Training_P_00001_LEFT_CC" / "series"
    folder.mkdir(parents=True)
    m = read_image(write_dicom(folder / "1-1.dcm", ramp12()))
    assert (m.meta["laterality"], m.meta["view"]) == ("L", "CC")
    m = read_image(write_dicom(tmp_path / "plain.dcm", ramp12()))
    assert (m.meta["laterality"], m.meta["view"]) == (None, None)


def test_pixel_spacing(tmp_path):
    m = read_image(write_dicom(tmp_path / "a.dcm", ramp12(), PixelSpacing=[0.07, 0.065]))
    assert m.meta["pixel_spacing_mm"] == (0.07, 0.065)
    m = read_image(write_dicom(tmp_path / "b.dcm", ramp12(), ImagerPixelSpacing=[0.1, 0.1]))
    assert m.meta["pixel_spacing_mm"] == (0.1, 0.1)


def test_dicom_tags_summarise_sequences_and_long_bytes(tmp_path):
    code = Dataset()
    code.CodeMeaning = "medio-lateral oblique"
    ds = make_dicom(ramp12(), ViewCodeSequence=[code], PatientName="Doe^Jane")
    ds.add_new(0x00091010, "OB", bytes(1000))
    ds.add_new(0x00091011, "LT", "x" * 500)
    tags = {t["tag"]: t for t in read_image(save(ds, tmp_path / "t.dcm")).meta["dicom_tags"]}
    assert tags["(0054,0220)"]["value"] == "<sequence of 1 item>"
    assert tags["(0009,1010)"]["value"] == "<1000 bytes>"
    assert len(tags["(0009,1011)"]["value"]) == 120
    assert tags["(0010,0010)"]["value"] == "Doe^Jane"
    assert "(7FE0,0010)" not in tags


# --- DICOM errors ----------------------------------------------------------------------------


def test_no_pixel_data(tmp_path):
    ds = make_dicom(ramp12())
    del ds.PixelData
    expect_error(save(ds, tmp_path / "x.dcm"), "no pixel data")


def test_no_pixel_data_without_preamble():
    expect_error(pydicom_file("ExplVR_LitEndNoMeta.dcm"), "no pixel data")


def test_rgb_dicom_is_refused(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    expect_error(
        write_dicom(tmp_path / "colour.dcm", rgb, photometric="RGB"), "RGB", "not supported"
    )


@pytest.mark.parametrize(
    ("name", "photometric"),
    [("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422"), ("examples_palette.dcm", "PALETTE")],
)
def test_colour_photometrics_are_refused(name, photometric):
    expect_error(pydicom_file(name), f"photometric interpretation {photometric}")


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"Patient notes, not an image\n" * 20,
    ],
)
def test_not_a_dicom_with_dcm_extension(tmp_path, content):
    path = tmp_path / "scan.dcm"
    path.write_bytes(content)
    expect_error(path, "not a DICOM file")


def test_damaged_dicom_after_preamble(tmp_path):
    path = tmp_path / "damaged.dcm"
    path.write_bytes(bytes(128) + b"DICM" + np.random.default_rng(4).bytes(2000))
    expect_error(path, "damaged")


def test_truncated_dicom_pixel_data(tmp_path):
    full = write_dicom(tmp_path / "full.dcm", ramp12(64, 64), bits_stored=12)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full.read_bytes()[:-300])
    expect_error(cut, "could not be decoded", "incomplete")


def test_absurd_dicom_size_is_refused_before_decoding(tmp_path):
    ds = make_dicom(np.zeros((2, 2), dtype=np.uint16))
    ds.Rows = ds.Columns = 30000  # declared; the pixel data is 8 bytes
    expect_error(save(ds, tmp_path / "huge.dcm"), "too large", "30000 x 30000")


# --- PNG, JPEG, TIFF, PGM --------------------------------------------------------------------


def test_png_16_bit_scaled_by_bit_depth_not_max(tmp_path):
    arr = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 5) + 3  # max 998
    path = tmp_path / "x16.png"
    Image.fromarray(arr).save(path)
    m = read_image(path)
    assert m.raw.dtype == np.uint16 and np.array_equal(m.raw, arr)
    assert m.pixels.max() == np.float32(998 / 65535)
    assert m.pixels[3, 4] == np.float32(int(arr[3, 4]) / 65535)
    assert m.meta["bits_stored"] == 16


def test_tiff_16_bit_and_first_page(tmp_path):
    arr = np.random.default_rng(5).integers(0, 65536, (30, 40)).astype(np.uint16)
    path = tmp_path / "x.tif"
    second = Image.fromarray(np.zeros_like(arr))
    Image.fromarray(arr).save(path, save_all=True, append_images=[second])
    m = read_image(path)
    assert np.array_equal(m.raw, arr)
    np.testing.assert_array_equal(m.pixels, (arr / 65535).astype(np.float32))
    assert m.meta["format"] == "TIFF" and m.meta["frames"] == 2


def test_tiff_8_bit(tmp_path):
    arr = np.random.default_rng(6).integers(0, 256, (30, 40)).astype(np.uint8)
    path = tmp_path / "x.tiff"
    Image.fromarray(arr).save(path)
    m = read_image(path)
    assert np.array_equal(m.raw, arr) and m.meta["bits_stored"] == 8


def test_png_exif_orientation_applied(tmp_path):
    arr = np.random.default_rng(7).integers(0, 256, (10, 16)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees for display
    path = tmp_path / "rotated.png"
    path.write_bytes(png_bytes(Image.fromarray(arr), exif=exif))
    m = read_image(path)
    assert np.array_equal(m.raw, np.rot90(arr, 2))


def test_jpeg_exif_orientation_applied(tmp_path):
    stored = np.zeros((60, 40), dtype=np.uint8)
    stored[:12, :12] = 255  # a bright block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer must turn it 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    m = read_image(path)
    assert m.pixels.shape == (40, 60)
    assert m.pixels[:10, -10:].mean() > 0.9  # the block is now at the top-right
    assert m.pixels[:10, :10].mean() < 0.1


def test_palette_png_converted_to_grey(tmp_path):
    index = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(index, mode="L").convert("P")
    image.putpalette([v for i in range(256) for v in (255 - i,) * 3])  # a reversed grey palette
    path = tmp_path / "palette.png"
    image.save(path)
    m = read_image(path)
    assert np.array_equal(m.raw, 255 - index)


def test_colour_png_converted_to_luma(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 255, 0)
    rgb[2, 2] = (10, 20, 30)
    path = tmp_path / "colour.png"
    Image.fromarray(rgb).save(path)
    m = read_image(path)
    assert np.array_equal(m.raw, np.asarray(Image.fromarray(rgb).convert("L")))
    assert m.raw[0, 0] == 76 and m.raw[1, 1] == 150  # ITU-R 601-2 luma, rounded


def test_pgm_8_bit(tmp_path):
    arr = np.random.default_rng(8).integers(0, 256, (12, 9)).astype(np.uint8)
    path = tmp_path / "mdb999.pgm"
    path.write_bytes(b"P5\n# MIAS style\n9 12\n255\n" + arr.tobytes())
    m = read_image(path)
    assert np.array_equal(m.raw, arr)
    assert m.meta["format"] == "PNM" and m.meta["bits_stored"] == 8


def test_pgm_12_bit_keeps_file_integers(tmp_path):
    arr = np.array([[0, 1, 5, 2048], [4000, 4095, 17, 3]], dtype=np.uint16)
    path = tmp_path / "x12.pgm"
    path.write_bytes(b"P5\n4 2\n4095\n" + arr.astype(">u2").tobytes())
    m = read_image(path)
    assert np.array_equal(m.raw, arr)
    assert m.meta["bits_stored"] == 12
    assert m.pixels[1, 1] == 1.0 and m.pixels[0, 1] == np.float32(1 / 4095)


def test_ascii_pgm_small_maxval(tmp_path):
    path = tmp_path / "tiny.pnm"
    path.write_text("P2\n3 2\n15\n0 1 2\n13 14 15\n")
    m = read_image(path)
    assert m.raw.tolist() == [[0, 1, 2], [13, 14, 15]]
    assert m.pixels[1, 2] == 1.0 and m.pixels[0, 1] == np.float32(1 / 15)


# --- other formats' errors -------------------------------------------------------------------


def test_text_file(tmp_path):
    path = tmp_path / "mdb001.txt"
    path.write_text("mdb001 G CIRC B 535 425 197\n")
    message = expect_error(path, "not an image MammoLab can read")
    assert message.startswith("mdb001.txt: ")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    expect_error(path, "empty")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nowhere.dcm", "not found")


def test_directory(tmp_path):
    folder = tmp_path / "images.png"
    folder.mkdir()
    expect_error(folder, "folder")


def test_truncated_png(tmp_path):
    noise = np.random.default_rng(9).integers(0, 256, (128, 128)).astype(np.uint8)
    data = png_bytes(Image.fromarray(noise))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "damaged or incomplete")


def test_too_wide_png(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (25000, 1)).save(path)
    expect_error(path, "too large", "25000 x 1")


def test_png_declaring_absurd_size(tmp_path):
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    expect_error(path, "too large")


def test_float_tiff_is_refused(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(path)
    expect_error(path, "floating-point")


# --- small pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("C_0029_1.LEFT_CC.jpg", ("L", "CC")),
        ("C_0029_1.RIGHT_MLO.jpg", ("R", "MLO")),
        ("C_0029_1.LEFT_CC_Mask.jpg", ("L", "CC")),
        ("Mass-Test_P_00173_RIGHT_CC", ("R", "CC")),
        ("Calc-Training_P_00005_LEFT_MLO_1", ("L", "MLO")),
        ("/data/cases/R_CC.dcm", ("R", "CC")),
        ("patient7_LMLO.png", ("L", "MLO")),
        ("mdb001.png", (None, None)),
        ("1-132.dcm", (None, None)),
        ("LEFT_vs_RIGHT_CC.png", (None, "CC")),
        ("left_xccl.tif", ("L", "XCCL")),
    ],
)
def test_laterality_view_from_name(name, expected):
    assert laterality_view_from_name(name) == expected


def test_image_extensions():
    assert IMAGE_EXTENSIONS == frozenset(
        {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".pgm", ".pnm", ".dcm", ".dicom"}
    )


def test_has_dicom_preamble(tmp_path):
    assert has_dicom_preamble(write_dicom(tmp_path / "a.dcm", ramp12()))
    assert not has_dicom_preamble(tmp_path / "missing.dcm")
    short = tmp_path / "short.dcm"
    short.write_bytes(b"DICM")
    assert not has_dicom_preamble(short)


def test_error_survives_pickling(tmp_path):
    error = ImageReadError(tmp_path / "x.dcm", "DICOM file has no pixel data")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == "x.dcm: DICOM file has no pixel data"
    assert copy.path == error.path and copy.reason == error.reason
