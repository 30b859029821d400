"""Region samples built in memory for the teacher tests (no dataset folder needed)."""
import numpy as np
import pytest

from refound_core.data.sample import RegionSample


def make_sample(i, names=(), categories=None, image=None):
    categories = list(categories) if categories is not None else ["food;cafe"] * len(names)
    return RegionSample(cell_id=f"EPSG:32650/256/{i}_0", bounds=(0.0, 0.0, 256.0, 256.0), crs="EPSG:32650",
                        poi_names=list(names), poi_categories=categories,
                        poi_xy=np.zeros((len(names), 2)), image=image,
                        image_coverage=1.0 if image is not None else 0.0)


@pytest.fixture
def samples():
    """12 regions: every 4th without POIs, every 5th without an image, images of two sizes."""
    rng = np.random.default_rng(0)
    kinds = [("Cafe", "food;cafe"), ("School", "education;school"), ("Bank", "finance;bank")]
    out = []
    for i in range(12):
        names, cats = [], []
        if i % 4:
            for j in range(1 + i % 5):
                name, cat = kinds[(i + j) % 3]
                names.append(f"{name} {i}-{j}")
                cats.append(cat)
        size = 64 if i % 2 else 48
        image = None if i % 5 == 0 else rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out.append(make_sample(i, names, cats, image))
    return out
