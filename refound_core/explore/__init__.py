"""Explore region embeddings (paper 4.3's region representations) without QGIS: similarity search,
typology clusters, PCA/UMAP colours and change between two embedding layers of one grid.

``io`` reads an embedding layer (GeoParquet from ``refound embed``, or a GeoPackage with the
plugin's ``emb_000...`` fields) into float32 arrays and writes results atomically; ``similar``,
``cluster``, ``colours`` and ``compare`` are pure numpy / scikit-learn. The ``refound explore``
command and the plugin's Processing algorithms both call these functions.
"""
