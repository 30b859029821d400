"""ReFound's Processing provider (id ``refound``): the algorithms are thin wrappers over the
same analysis the dock runs (``refound_qgis.task.execute``), so the toolbox, the batch dialog,
Model Builder and ``qgis_process run refound:...`` all get it for free."""
