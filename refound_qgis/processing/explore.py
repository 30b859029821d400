"""Explore algorithms: ``refound:find_similar_regions``, ``refound:cluster_regions``,
``refound:embedding_colours``, ``refound:compare_embeddings``. Thin wrappers over
``refound_core.explore`` (the same code as ``refound explore``): a file in, a styled GeoPackage out."""
from __future__ import annotations

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsVectorLayer,
)

from refound_core.errors import InputError

from .. import explore_layers, explore_styles
from ..settings import tr
from .common import RefoundAlgorithm, _advanced, _keep

COLUMNS = ("fused", "h_P", "h_S")
FILTER = "Embedding layers (*.parquet *.geoparquet *.gpkg)"


class _Styler(QgsProcessingLayerPostProcessorInterface):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - QGIS's name
        if isinstance(layer, QgsVectorLayer):
            explore_styles.style_layer(layer, self.kind)


class _ExploreAlgorithm(RefoundAlgorithm):
    ALG_ID = KIND = TITLE = HELP = ""
    INPUT, COLUMN, OUTPUT = "INPUT", "COLUMN", "OUTPUT"

    def name(self):
        return self.ALG_ID

    def displayName(self):  # noqa: N802
        return tr(self.TITLE)

    def shortHelpString(self):  # noqa: N802
        return tr(self.HELP + " Input: a GeoParquet from `refound embed` or a GeoPackage with emb_000... fields; "
                  "output: a styled GeoPackage (the style is stored inside it).")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(self.INPUT, tr("Embedding layer"), fileFilter=FILTER))
        self.add_parameters()
        self.addParameter(_advanced(QgsProcessingParameterEnum(self.COLUMN, tr("GeoParquet embedding column"),
                                                               list(COLUMNS), defaultValue=0)))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, tr(self.TITLE),
                                                                "GeoPackage (*.gpkg)"))
        self.addOutput(QgsProcessingOutputNumber("CELLS", tr("Number of cells")))

    def add_parameters(self):
        pass

    def table(self, key, parameters, context):
        path = self.parameterAsFile(parameters, key, context)
        return explore_layers.read_table(path, COLUMNS[self.parameterAsEnum(parameters, self.COLUMN, context)])

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        try:
            table, columns, extra, results = self.compute(parameters, context, feedback)
            explore_layers.write_gpkg(table, columns, out, self.displayName(), self.KIND, **extra)
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        details = QgsProcessingContext.LayerDetails(self.displayName(), context.project(), self.OUTPUT)
        details.setPostProcessor(_keep(_Styler(self.KIND)))
        context.addLayerToLoadOnCompletion(out, details)
        results.update({self.OUTPUT: out})
        return results


class FindSimilarRegions(_ExploreAlgorithm):
    ALG_ID, KIND, TITLE = "find_similar_regions", "similar", "Find similar regions"
    HELP = ("Cosine similarity of every cell to the mean embedding of the query cells (ids, comma-separated, "
            "or those inside a WKT polygon), ranked; optionally scored over a second layer (another city).")
    CELLS, POLYGON, TOP_K, TARGET = "QUERY_CELLS", "QUERY_POLYGON", "TOP_K", "TARGET"

    def add_parameters(self):
        self.addParameter(QgsProcessingParameterString(self.CELLS, tr("Query cell ids (comma-separated)"),
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(self.POLYGON, tr("Query polygon (WKT, layer CRS)"),
                                                       optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.TOP_K, tr("Top k"), QgsProcessingParameterNumber.Integer,
                                                       20, minValue=1))
        self.addParameter(QgsProcessingParameterFile(self.TARGET, tr("Score this other embedding layer instead"),
                                                     fileFilter=FILTER, optional=True))

    def compute(self, parameters, context, feedback):
        import numpy as np

        from refound_core.explore.similar import find_similar

        table = self.table(self.INPUT, parameters, context)
        target = self.table(self.TARGET, parameters, context) if self.parameterAsFile(parameters, self.TARGET, context) else None
        ids = [c.strip() for c in (self.parameterAsString(parameters, self.CELLS, context) or "").split(",") if c.strip()]
        wkt = (self.parameterAsString(parameters, self.POLYGON, context) or "").strip()
        if wkt:  # QGIS geometry, not shapely (explore_layers: GEOS clash inside qgis_process)
            ids += explore_layers.cells_in_polygon(table, wkt)
        res = find_similar(table, ids, None, self.parameterAsInt(parameters, self.TOP_K, context), target)
        out_t = target or table
        query = np.zeros(len(out_t.cell_ids), dtype=bool)
        if target is None:
            query[res["query"]] = True
        top = np.zeros(len(out_t.cell_ids), dtype=bool)
        top[res["top"]] = True
        cols = {"similarity": res["similarity"], "rank": res["rank"], "query": query, "top_k": top}
        return out_t, cols, {}, {"CELLS": len(out_t.cell_ids)}


class ClusterRegions(_ExploreAlgorithm):
    ALG_ID, KIND, TITLE = "cluster_regions", "cluster", "Cluster regions"
    HELP = ("A typology of places: k-means of the embeddings (k chosen by silhouette when 0) or HDBSCAN; "
            "categorical style with a legend.")
    K, METHOD, POIS, CATEGORY_FIELD = "K", "METHOD", "POIS", "CATEGORY_FIELD"

    def add_parameters(self):
        self.addParameter(QgsProcessingParameterNumber(self.K, tr("Number of clusters (0: by silhouette)"),
                                                       QgsProcessingParameterNumber.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterEnum(self.METHOD, tr("Method"), ["kmeans", "hdbscan"], defaultValue=0))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.POIS, tr("POI layer (names each cluster's top categories)"),
            [QgsProcessing.TypeVectorPoint], optional=True))
        self.addParameter(QgsProcessingParameterField(self.CATEGORY_FIELD, tr("POI category field"), "category",
                                                      self.POIS, optional=True))
        self.addOutput(QgsProcessingOutputNumber("K", tr("Number of clusters")))

    def compute(self, parameters, context, feedback):
        from refound_core.explore.cluster import cluster

        table = self.table(self.INPUT, parameters, context)
        k = self.parameterAsInt(parameters, self.K, context) or None
        pois = None
        source = self.parameterAsSource(parameters, self.POIS, context)
        if source is not None:
            field = self.parameterAsString(parameters, self.CATEGORY_FIELD, context) or "category"
            pois = explore_layers.poi_points(source, table.crs, field, context.transformContext())
        res = cluster(table, k, ("kmeans", "hdbscan")[self.parameterAsEnum(parameters, self.METHOD, context)],
                      pois=pois)
        for row in res["summary"]:
            feedback.pushInfo(tr("cluster {c}: {n} cells").format(c=row["cluster"], n=row["size"])
                              + (f"; {row['top_poi_categories']}" if row.get("top_poi_categories") else ""))
        return table, {"cluster": res["cluster"]}, {}, {"CELLS": len(table.cell_ids), "K": res["k"]}


class EmbeddingColours(_ExploreAlgorithm):
    ALG_ID, KIND, TITLE = "embedding_colours", "colours", "Embedding colours"
    HELP = "The first three principal components (or UMAP when installed) as an RGB colour per cell."
    METHOD = "METHOD"

    def add_parameters(self):
        self.addParameter(QgsProcessingParameterEnum(self.METHOD, tr("Projection"), ["pca", "umap"], defaultValue=0))

    def compute(self, parameters, context, feedback):
        import numpy as np

        from refound_core.explore.colours import embedding_colours

        table = self.table(self.INPUT, parameters, context)
        res = embedding_colours(table, ("pca", "umap")[self.parameterAsEnum(parameters, self.METHOD, context)])
        c = res["components"]
        cols = {"colour": np.asarray(res["colour"], dtype=object), "pc1": c[:, 0], "pc2": c[:, 1], "pc3": c[:, 2]}
        return table, cols, {}, {"CELLS": len(table.cell_ids)}


class CompareEmbeddings(_ExploreAlgorithm):
    ALG_ID, KIND, TITLE = "compare_embeddings", "compare", "Compare embeddings"
    HELP = ("Change between two embedding layers of the same grid (two image dates or POI snapshots): cosine "
            "distance and rank per cell; cells present in one layer only are flagged in 'status'.")
    OTHER = "OTHER"

    def add_parameters(self):
        self.addParameter(QgsProcessingParameterFile(self.OTHER, tr("Second embedding layer"), fileFilter=FILTER))
        self.addOutput(QgsProcessingOutputNumber("CHANGED_ONLY_ONE", tr("Cells in one layer only")))

    def compute(self, parameters, context, feedback):
        from refound_core.explore.compare import STATUS_ONLY_A, STATUS_ONLY_B, compare

        a, b = self.table(self.INPUT, parameters, context), self.table(self.OTHER, parameters, context)
        res = compare(a, b)
        cols = {"distance": res["distance"], "rank": res["rank"], "status": res["status"]}
        one = int(((res["status"] == STATUS_ONLY_A) | (res["status"] == STATUS_ONLY_B)).sum())
        return a, cols, {"geometry": res["geometry"], "cell_ids": res["cell_ids"]}, \
            {"CELLS": len(res["cell_ids"]), "CHANGED_ONLY_ONE": one}


EXPLORE_ALGORITHMS = (FindSimilarRegions, ClusterRegions, EmbeddingColours, CompareEmbeddings)
