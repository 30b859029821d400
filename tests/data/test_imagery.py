"""Satellite chips from real rasters (NAIP RGBN, SpaceNet-6 RGB) and tiny seeded rasters."""
import pickle

import numpy as np
import pytest

from refound_core.data.grid import Grid
from refound_core.data.imagery import ChipReader
from refound_core.errors import InputError

rasterio = pytest.importorskip("rasterio")
from rasterio.enums import Resampling  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window, from_bounds  # noqa: E402
from rasterio.windows import bounds as window_bounds  # noqa: E402


@pytest.fixture(scope="module")
def naip(shared_dir):
    return shared_dir / "data" / "rasters" / "naip_north_dakota_rgbn_5m.tif"


@pytest.fixture(scope="module")
def rotterdam(shared_dir):
    return shared_dir / "data" / "rasters" / "spacenet6_rotterdam_rgb_4p5m.tif"


def _hwc(a):
    return np.moveaxis(a, 0, -1).astype(np.int64)


def make_raster(path, data, crs="EPSG:32650", origin=(1000.0, 2000.0), res=10.0, nodata=None, **extra):
    data = np.asarray(data)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=from_origin(*origin, res, res), nodata=nodata,
                       **extra) as dst:
        dst.write(data)
    return path


def test_chip_matches_direct_read_pixel_aligned(naip):
    with rasterio.open(naip) as src, ChipReader(naip, size_px=64) as reader:
        win = Window(100, 200, 64, 64)
        chip = reader.read(window_bounds(win, src.transform), src.crs)
        direct = src.read([1, 2, 3], window=win)
    assert chip.coverage == 1.0 and chip.image.dtype == np.uint8 and chip.image.shape == (64, 64, 3)
    assert np.abs(chip.image.astype(np.int64) - _hwc(direct)).max() <= 1


@pytest.mark.parametrize("cell_size,size_px", [(320.0, 64), (256.0, 256)])
def test_grid_cell_chip_matches_resampled_direct_read(naip, cell_size, size_px):
    """A snapped cell is not pixel-aligned (NAIP's origin is at x = 4 mod 5) and 256 px upsamples 5x."""
    g = Grid("EPSG:26914", cell_size)
    with rasterio.open(naip) as src, ChipReader(naip, size_px=size_px) as reader:
        cell = g.cells_for_extent(487_000, 5_207_000, 487_001, 5_207_001)[0]
        chip = reader.read_cell(cell)
        direct = src.read([1, 2, 3], window=from_bounds(*cell.bounds, transform=src.transform),
                          out_shape=(3, size_px, size_px), resampling=Resampling.bilinear)
    assert chip.coverage == 1.0
    assert np.abs(chip.image.astype(np.int64) - _hwc(direct)).mean() < 1.5


def test_band_selection_rgb_from_rgbn(naip):
    with rasterio.open(naip) as src:
        win = Window(300, 300, 32, 32)
        b = window_bounds(win, src.transform)
        bands = src.read(window=win)
    default = ChipReader(naip, size_px=32).read(b, "EPSG:26914").image
    assert np.array_equal(default, _hwc(bands[:3]))
    assert not np.array_equal(default[..., 0], bands[3])  # NIR is not red
    nir_rg = ChipReader(naip, size_px=32, bands=(4, 1, 2)).read(b, "EPSG:26914").image
    assert np.array_equal(nir_rg, _hwc(bands[[3, 0, 1]]))
    with pytest.raises(InputError, match="between 1 and 4"):
        ChipReader(naip, bands=(1, 2, 5))


def test_partial_coverage_at_the_raster_edge(naip):
    with rasterio.open(naip) as src:
        left, top = src.bounds.left, src.bounds.top
        direct = src.read([1, 2, 3], window=Window(0, 0, 32, 64))
    # 64 px of 5 m: the west half lies outside the raster.
    chip = ChipReader(naip, size_px=64).read((left - 160, top - 320, left + 160, top), "EPSG:26914")
    assert chip.coverage == pytest.approx(0.5, abs=1 / 64)
    assert (chip.image[:, :31] == 0).all()
    assert np.abs(chip.image[:, 33:].astype(np.int64) - _hwc(direct)[:, 1:]).max() <= 1
    # A corner quarter.
    chip = ChipReader(naip, size_px=64).read((left - 160, top - 160, left + 160, top + 160), "EPSG:26914")
    assert chip.coverage == pytest.approx(0.25, abs=2 / 64)


def test_cell_outside_the_raster(naip):
    chip = ChipReader(naip).read_cell(Grid("EPSG:26914").cell(0, 0))
    assert chip.image is None and chip.coverage == 0.0
    far = Grid("EPSG:32650").cell(1830, 17542)  # another continent, another CRS
    assert ChipReader(naip).read_cell(far).image is None


def test_cell_in_another_crs_is_reprojected(naip):
    from rasterio.warp import reproject, transform_bounds
    from rasterio.transform import from_bounds as transform_from_bounds

    g = Grid("EPSG:5070", 256.0)  # CONUS Albers: rotated a few degrees against UTM 14N
    with rasterio.open(naip) as src:
        centre = transform_bounds(src.crs, "EPSG:5070", *src.bounds)
        cx, cy = (centre[0] + centre[2]) / 2, (centre[1] + centre[3]) / 2
        cell = g.cells_for_extent(cx, cy, cx + 1, cy + 1)[0]
        chip = ChipReader(naip, size_px=128).read_cell(cell)
        expected = np.zeros((3, 128, 128), np.uint8)
        reproject(src.read([1, 2, 3]), expected, src_transform=src.transform, src_crs=src.crs, src_nodata=0,
                  dst_transform=transform_from_bounds(*cell.bounds, 128, 128), dst_crs="EPSG:5070",
                  resampling=Resampling.bilinear)
        # Independent of any warping: the mean colour of the source pixels under the cell.
        sb = transform_bounds("EPSG:5070", src.crs, *cell.bounds)
        under = src.read([1, 2, 3], window=from_bounds(*sb, transform=src.transform))
    assert chip.coverage == 1.0
    assert np.abs(chip.image.astype(np.int64) - _hwc(expected)).mean() < 1.0
    np.testing.assert_allclose(chip.image.reshape(-1, 3).mean(0), under.reshape(3, -1).mean(1), atol=6)


def test_rotterdam_rgb_direct_and_reprojected(rotterdam):
    with rasterio.open(rotterdam) as src:
        win = Window(50, 60, 80, 80)
        b = window_bounds(win, src.transform)
        direct = src.read(window=win)
        chip = ChipReader(rotterdam, size_px=80).read(b, src.crs)
        assert np.abs(chip.image.astype(np.int64) - _hwc(direct)).max() <= 1
        # The same ground in the Dutch national grid (EPSG:28992).
        from rasterio.warp import transform_bounds

        rd = transform_bounds(src.crs, "EPSG:28992", *b)
        inner = (rd[0] + 60, rd[1] + 60, rd[2] - 60, rd[3] - 60)
        chip_rd = ChipReader(rotterdam, size_px=64).read(inner, "EPSG:28992")
        under = src.read(window=from_bounds(*transform_bounds("EPSG:28992", src.crs, *inner), transform=src.transform))
    assert chip_rd.coverage == 1.0
    np.testing.assert_allclose(chip_rd.image.reshape(-1, 3).mean(0), under.reshape(3, -1).mean(1), atol=6)


def test_one_band_is_replicated_with_a_flag(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (1, 16, 16), dtype=np.uint8)
    path = make_raster(tmp_path / "grey.tif", data)
    reader = ChipReader(path, size_px=16)
    chip = reader.read((1000, 1840, 1160, 2000), "EPSG:32650")
    assert chip.replicated and reader.replicated and reader.warnings
    assert np.array_equal(chip.image[..., 0], data[0])
    assert np.array_equal(chip.image[..., 0], chip.image[..., 2])


def test_two_bands_are_refused_unless_chosen(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    path = make_raster(tmp_path / "two.tif", data)
    with pytest.raises(InputError, match="2 bands") as err:
        ChipReader(path)
    assert str(path) in str(err.value)
    chip = ChipReader(path, size_px=8, bands=(1, 2, 2)).read((1000, 1920, 1080, 2000), "EPSG:32650")
    assert np.array_equal(chip.image[..., 2], data[1])


def test_four_band_raster_uses_the_first_three(tmp_path):
    data = np.random.default_rng(3).integers(1, 256, (4, 8, 8), dtype=np.uint8)
    # MINISBLACK as in NAIP: rasterio would otherwise tag a 4-band uint8 GeoTIFF as RGBA.
    path = make_raster(tmp_path / "rgbn.tif", data, photometric="MINISBLACK")
    chip = ChipReader(path, size_px=8).read((1000, 1920, 1080, 2000), "EPSG:32650")
    assert np.array_equal(chip.image, np.moveaxis(data[:3], 0, -1))


def test_nodata_everywhere_gives_no_image(tmp_path):
    path = make_raster(tmp_path / "empty.tif", np.full((3, 8, 8), 255, np.uint8), nodata=255)
    chip = ChipReader(path, size_px=8).read((1000, 1920, 1080, 2000), "EPSG:32650")
    assert chip.image is None and chip.coverage == 0.0


def test_nodata_half_gives_half_coverage_and_black_pixels(tmp_path):
    data = np.random.default_rng(4).integers(1, 256, (3, 8, 8), dtype=np.uint8)
    data[:, :, 4:] = 0
    path = make_raster(tmp_path / "half.tif", data, nodata=0)
    chip = ChipReader(path, size_px=8).read((1000, 1920, 1080, 2000), "EPSG:32650")
    assert chip.coverage == 0.5
    assert np.array_equal(chip.image[:, :4], np.moveaxis(data[:, :, :4], 0, -1)) and (chip.image[:, 4:] == 0).all()


def test_alpha_band_sets_coverage(tmp_path):
    from rasterio.enums import ColorInterp

    data = np.random.default_rng(5).integers(1, 256, (4, 8, 8), dtype=np.uint8)
    data[3] = 255
    data[3, :2] = 0  # top quarter transparent
    path = make_raster(tmp_path / "rgba.tif", data, photometric="RGB", alpha="YES")
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    chip = ChipReader(path, size_px=8).read((1000, 1920, 1080, 2000), "EPSG:32650")
    assert chip.coverage == 0.75 and (chip.image[:2] == 0).all()


def test_uint16_rescale_rule(tmp_path):
    ramp = np.arange(3 * 20 * 20, dtype=np.uint16).reshape(3, 20, 20) * 7
    path = make_raster(tmp_path / "u16.tif", ramp)
    chip = ChipReader(path, size_px=20).read((1000, 1800, 1200, 2000), "EPSG:32650")
    for b in range(3):  # documented rule: per band, [p2, p98] -> [0, 255], clipped
        lo, hi = np.percentile(ramp[b].astype(float), [2, 98])
        expected = np.rint(np.clip((ramp[b] - lo) / (hi - lo) * 255, 0, 255))
        assert np.abs(chip.image[..., b] - expected).max() <= 1
    fixed = ChipReader(path, size_px=20, value_range=(0, 8400)).read((1000, 1800, 1200, 2000), "EPSG:32650")
    assert np.abs(fixed.image[..., 0].astype(float) - ramp[0] / 8400 * 255).max() <= 1


def test_bad_rasters(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ChipReader(tmp_path / "none.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match="cannot be opened"):
        ChipReader(tmp_path / "junk.tif")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio warns about the missing georeferencing
        path = make_raster(tmp_path / "nocrs.tif", np.zeros((3, 4, 4), np.uint8), crs=None)
    with pytest.raises(InputError, match="no CRS"):
        ChipReader(path)


def test_reader_pickles_for_workers(naip):
    reader = ChipReader(naip, size_px=16)
    cell = Grid("EPSG:26914", 80.0).cells_for_extent(487_000, 5_207_000, 487_001, 5_207_001)[0]
    first = reader.read_cell(cell).image
    clone = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(clone.read_cell(cell).image, first)
