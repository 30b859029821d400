"""The result layer: one polygon per cell with the prediction, styled, with provenance.

Fields (the same for every task and the same as the core's GeoPackage writer, so layers join on
``cell_id`` whatever produced them): ``cell_id``, ``prediction`` (double; NULL where not
predicted), ``poi_count``, ``image_coverage``, ``image_used`` (1 / 0), ``sufficient`` (1 / 0), then any further per-cell
output the model returns (``refound_core.inference.results.extra_columns``, as the core writers
do; built in :mod:`refound_qgis.features`). The embedding task adds ``emb_000...`` (the fused region embedding, paper 4.3) and puts its
first principal component in ``prediction`` so the map shows structure.

Styling reuses ``refound_core.inference.styles`` (the same QML the GeoPackage writer embeds):
a probability ramp with the 0.5 break for urban villages, quantile-graduated ramps for population
and commercial activeness, and a transparent grey hatch for insufficient cells. The layer name
(the legend title) says task, model and date; the layer metadata says the rest.
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
from typing import Optional, Sequence

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsLayerMetadata,
    QgsLayerTreeLayer,
    QgsProject,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtXml import QDomDocument

from refound_core.errors import InputError
from refound_core.inference import styles

from .features import (  # noqa: F401 - results' interface: fields and features of the cells
    CELL_ID,
    EMBEDDING_PREFIX,
    IMAGE_COVERAGE,
    IMAGE_USED,
    POI_COUNT,
    PREDICTION,
    SUFFICIENT,
    _number,
    embedding_dim_of,
    extra_fields_of,
    first_principal_component,
    make_features,
    result_fields,
)
from .settings import task_label, tr

CELLS_LAYER = "cells"  # the GeoPackage layer name, as the core writer's
RESULT_PROPERTY = "refound/result"  # custom property marking the plugin's result layers
STYLE_NAME_MAX = 30  # GDAL's GeoPackage layer_styles.styleName limit (longer ones warn on every write)


def style_name(task: str) -> str:
    """The short name the style is stored under inside a GeoPackage (not the long legend title)."""
    return f"ReFound {task}"[:STYLE_NAME_MAX]


def layer_title(task: str, model_name: str, when: Optional[_dt.datetime] = None) -> str:
    """Legend title: task, model and date (the user sees where the map came from)."""
    when = when or _dt.datetime.now()
    return tr("ReFound {task} – {model} – {date}").format(task=task_label(task), model=model_name or "?",
                                                         date=when.strftime("%Y-%m-%d %H:%M:%S"))


def memory_layer(cells: Sequence, crs_authid: str, title: str, embeddings: bool = False) -> QgsVectorLayer:
    dim = embedding_dim_of(cells) if embeddings else 0
    extras = extra_fields_of(cells)
    fields = result_fields(dim, extras)
    layer = QgsVectorLayer(f"Polygon?crs={crs_authid}", title, "memory")
    pr = layer.dataProvider()
    pr.addAttributes(fields.toList())
    layer.updateFields()
    pr.addFeatures(make_features(cells, layer.fields(), dim, extras))
    layer.updateExtents()
    return layer


def write_geopackage(layer: QgsVectorLayer, path: str, task: str = "", kind: Optional[str] = None,
                     classes: Optional[list] = None) -> QgsVectorLayer:
    """Write a prediction ``layer`` to a GeoPackage atomically with the task's style stored as the
    file's default (``layer_styles``), and return the layer read back from the file."""
    path = os.path.abspath(path)
    if not path.lower().endswith(".gpkg"):
        path += ".gpkg"
    style = (lambda written: apply_style(written, task, kind, classes)) if task else None
    write_styled_gpkg(layer, path, CELLS_LAYER, style, style_name(task) if task else "", "ReFound default style")
    out = QgsVectorLayer(f"{path}|layername={CELLS_LAYER}", layer.name(), "ogr")
    if not out.isValid():
        raise InputError(tr("The written GeoPackage {path} cannot be read back.").format(path=path))
    return out


def write_styled_gpkg(layer: QgsVectorLayer, path: str, layer_name: str, style=None, name: str = "",
                      description: str = "") -> str:
    """The one atomic GeoPackage write of the plugin (prediction and explore layers): a temp file
    in the same folder, then os.replace; ``style(layer)``, when given, styles a layer on the temp
    file and that style is stored as the file's default under ``name``.

    The style goes in before the rename, through a layer on the temp file that is closed first:
    saving a style into a GeoPackage that another QGIS layer is reading broke that layer's reads
    ("unable to open database file") on QGIS 3.22.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(tr("The output folder {folder} does not exist; choose an existing folder.").format(folder=folder))
    fd, tmp = tempfile.mkstemp(prefix=".refound-", suffix=".gpkg", dir=folder)
    os.close(fd)
    os.remove(tmp)
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    opts.layerName = layer_name
    opts.fileEncoding = "UTF-8"
    try:
        err, msg, _, _ = QgsVectorFileWriter.writeAsVectorFormatV3(
            layer, tmp, QgsProject.instance().transformContext(), opts)
        if err != QgsVectorFileWriter.WriterError.NoError:
            raise InputError(tr("Writing {path} failed: {msg}").format(path=path, msg=msg))
        if style is not None:
            written = QgsVectorLayer(f"{tmp}|layername={layer_name}", layer.name(), "ogr")
            style(written)
            written.saveStyleToDatabase(name, description, True, "")
            del written
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path


def apply_style(layer: QgsVectorLayer, task: str, kind: Optional[str] = None, classes: Optional[list] = None) -> None:
    """Style a result layer with the core QML for ``task`` (values read from the layer; ``classes``
    names the categories of a multiclass head)."""
    idx = layer.fields().indexOf(PREDICTION)
    values = [f.attribute(idx) for f in layer.getFeatures()]
    values = [v for v in (_number(x) for x in values) if v is not None]
    style_task = "commercial" if task == "embedding" else task
    qml = styles.qml_for_task(style_task, values, kind=kind or ("regression" if task == "embedding" else None),
                              classes=classes)
    doc = QDomDocument()
    ok = doc.setContent(qml)
    if not (ok[0] if isinstance(ok, tuple) else ok):
        raise RuntimeError("the core style is not valid XML")
    ok, err = layer.importNamedStyle(doc)
    if not ok:
        raise RuntimeError(f"the core style could not be applied: {err}")
    layer.triggerRepaint()


def set_provenance(layer: QgsVectorLayer, task: str, model_name: str, checkpoint: str, inputs: dict,
                   when: Optional[_dt.datetime] = None, backend: str = "") -> None:
    when = when or _dt.datetime.now()
    md = QgsLayerMetadata()
    md.setTitle(layer.name())
    lines = [tr("ReFound (Xiao et al., KDD 2024) prediction: {task}.").format(task=task_label(task)),
             tr("Model: {model} from {ckpt}.").format(model=model_name, ckpt=checkpoint or "?"),
             tr("Created: {date}.").format(date=when.isoformat(timespec="seconds"))]
    if backend:
        lines.append(tr("Backend: {b}.").format(b=backend))
    lines += [f"{k}: {v}" for k, v in inputs.items() if v]
    lines.append(tr("Cells with sufficient = 0 had neither POIs nor imagery and were not predicted."))
    md.setAbstract("\n".join(lines))
    md.setKeywords({"refound": [task, model_name]})
    layer.setMetadata(md)


def unique_name(name: str, project: QgsProject) -> str:
    """``name``, or ``name (2)``, ``name (3)``... when the project already has a layer of that name."""
    taken = {lyr.name() for lyr in project.mapLayers().values()}
    k, out = 2, name
    while out in taken:
        out, k = f"{name} ({k})", k + 1
    return out


def add_to_project(layer: QgsVectorLayer, input_layer_ids: Sequence[str] = (), project: QgsProject = None) -> None:
    """Add ``layer`` to the project above the top-most of the input layers and of earlier ReFound
    results (no inputs: on top), so a new analysis is always visible; its name is made unique."""
    project = project or QgsProject.instance()
    layer.setName(unique_name(layer.name(), project))
    project.addMapLayer(layer, False)
    root = project.layerTreeRoot()
    wanted = set(i for i in input_layer_ids if i)
    for node in root.findLayers() if wanted else []:  # tree order: first found = top-most
        other = node.layer()
        if node.layerId() != layer.id() and (node.layerId() in wanted or (
                other is not None and other.customProperty(RESULT_PROPERTY))):
            parent = node.parent()
            parent.insertChildNode(parent.children().index(node), QgsLayerTreeLayer(layer))
            return
    root.insertChildNode(0, QgsLayerTreeLayer(layer))


def build_result_layer(cells: Sequence, crs_authid: str, task: str, model_name: str,
                       output_path: str = "", checkpoint: str = "", inputs: Optional[dict] = None,
                       kind: Optional[str] = None, backend: str = "",
                       when: Optional[_dt.datetime] = None, classes: Optional[list] = None) -> QgsVectorLayer:
    """The styled result layer (memory, or GeoPackage when ``output_path`` is set); not yet in the project."""
    when = when or _dt.datetime.now()
    title = layer_title(task, model_name, when)
    layer = memory_layer(cells, crs_authid, title, embeddings=(task == "embedding"))
    if output_path:
        # The style is stored inside the GeoPackage too, so the file opens styled elsewhere.
        layer = write_geopackage(layer, output_path, task, kind, classes)
    apply_style(layer, task, kind, classes)
    set_provenance(layer, task, model_name, checkpoint, inputs or {}, when, backend)
    layer.setCustomProperty(RESULT_PROPERTY, task)
    return layer


def crs_of(authid: str) -> QgsCoordinateReferenceSystem:
    return QgsCoordinateReferenceSystem(authid)


def is_polygon_layer(layer) -> bool:
    return isinstance(layer, QgsVectorLayer) and layer.geometryType() == QgsWkbTypes.GeometryType.PolygonGeometry
