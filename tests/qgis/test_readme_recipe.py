"""The README's ``qgis_process`` recipe, run verbatim (issue: it failed with ModuleNotFoundError
because the plugin's cut-down refound_core shadowed the venv's editable install).

The bash block is taken from README.md as written; only what a user fills in is supplied: the
extent placeholder, and the files it names (pois.gpkg, imagery.tif, ckpt) in the folder it runs
in. That folder stands for the user's checkout (its entries link to this repository's, .venv
included), so ``$PWD`` means what it means for the user.
"""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.qgis
PLACEHOLDER = '"XMIN,XMAX,YMIN,YMAX [EPSG:32650]"'


def readme_recipe() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)
    recipe = [b for b in blocks if "qgis_process.bin run" in b]
    assert len(recipe) == 1, "README.md must hold exactly one qgis_process recipe block"
    return recipe[0]


@pytest.mark.slow
def test_readme_qgis_process_recipe_runs_verbatim(scene, checkpoints, tmp_path):
    import geopandas as gpd

    from test_processing import SCENE_CELLS, extent_string

    recipe = readme_recipe()
    assert PLACEHOLDER in recipe, "the test fills in the README's extent placeholder; keep them in step"
    work = tmp_path / "checkout"
    work.mkdir()
    for entry in ("scripts", "refound_qgis", "refound_core", "training", "metadata.txt", "project.ini", "LICENSE",
                  ".venv"):
        if (REPO / entry).exists():
            (work / entry).symlink_to(REPO / entry)
    # the user's inputs, with the field names the recipe uses
    pois = gpd.read_file(scene["pois"], layer="pois").rename(columns={"title": "name", "kind": "category"})
    pois.to_file(work / "pois.gpkg", layer="pois", driver="GPKG", engine="pyogrio")
    (work / "imagery.tif").symlink_to(scene["imagery"])
    (work / "ckpt").symlink_to(checkpoints["population"])
    # pasted into a shell: each line runs even if an earlier one complains ("already enabled"
    # exits 1 on a second run), and the status is the last command's, qgis_process run's
    script = recipe.replace(PLACEHOLDER, f'"{extent_string()}"')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "QGIS_PLUGINPATH")}
    env["HOME"] = str(tmp_path / "home")  # a new user's QGIS profile
    (tmp_path / "home").mkdir()
    res = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr
    out = work / "population.gpkg"
    with sqlite3.connect(out) as db:
        styles = db.execute("SELECT count(*) FROM layer_styles").fetchone()[0]
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(str(out), "population", "ogr")
    cells = layer.featureCount()
    del layer
    assert cells == SCENE_CELLS ** 2 and styles >= 1
