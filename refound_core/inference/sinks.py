"""Where the cells' results go: the :class:`ResultSink` interface and the file sinks.

:func:`refound_core.inference.pipeline.run_analysis` opens a sink with a :class:`RunInfo`
(grid CRS, task, head kind, model), writes one :class:`~refound_core.inference.results.CellResult`
per cell, then closes it (commit) or aborts it (a failed or canceled run leaves nothing). Every
per-cell output the model returns beyond the fixed columns travels in the result
(``results.extra_columns``) and every sink writes it.

Sharding: a sink makes a *part* sink per shard (:meth:`ResultSink.part`) and assembles the
parts at the end (:meth:`ResultSink.assemble`); under ``torchrun`` a shard is a rank's blocks.
The QGIS plugin has its own sink (``refound_qgis.sinks``) that builds a QGIS layer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class RunInfo:
    """What a sink needs to know before the first result.

    Attributes:
        crs: the cells' grid CRS; task: the core task (``embed`` for embeddings);
        kind, classes: the head's kind and class names (styles, legends);
        hidden_size, embeddings: embedding width and the vectors requested (``embed``);
        model: the model's name; provenance: ``{key: value}`` for the output's metadata.
    """

    crs: str
    task: str
    kind: Optional[str] = None
    classes: Optional[list] = None
    hidden_size: int = 0
    embeddings: tuple = ("h_P", "h_S", "fused")
    model: str = ""
    provenance: dict = field(default_factory=dict)


class ResultSink(ABC):
    """Receives the results of one run (or one shard of it)."""

    @abstractmethod
    def open(self, info: RunInfo) -> None:
        """Called once, before the first :meth:`write`."""

    @abstractmethod
    def write(self, result) -> None:
        """One cell's result, in the run's order."""

    @abstractmethod
    def close(self):
        """Commit (atomically, for files); returns what was produced (a path, a layer ...)."""

    def abort(self) -> None:
        """Drop everything written (the run failed or was canceled)."""

    def part(self, name: str) -> "ResultSink":
        """A sink for one shard of the run (same kind, written beside the target)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded")

    def assemble(self, parts: list, info: RunInfo) -> None:
        """Write the final output from the finished parts (then remove them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded")


class _FileSink(ResultSink):
    """A file output written by one of ``refound_core.inference.writers``'s atomic writers."""

    def __init__(self, path):
        self.path = Path(path)
        self._writer = None

    def _make_writer(self, path: Path, info: RunInfo):
        raise NotImplementedError

    def open(self, info: RunInfo) -> None:
        self._writer = self._make_writer(self.path, info)

    def write(self, result) -> None:
        self._writer.write(result)

    def close(self) -> Path:
        return self._writer.close()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

    def part_path(self, name: str) -> Path:
        return self.path.with_name(f".{self.path.name}.part{name}{self.path.suffix}")

    def part(self, name: str) -> "ResultSink":
        return type(self)(self.part_path(name))

    def assemble(self, parts: list, info: RunInfo) -> None:
        paths = [p.path for p in parts]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise RuntimeError(f"distributed inference: part files {missing} are missing; a rank failed")
        writer = self._make_writer(self.path, info)
        with writer:
            for p in paths:
                writer.append_part(p)
        for p in paths:
            p.unlink()


class GeoPackageSink(_FileSink):
    """Predictions to a styled GeoPackage (``writers.GeoPackageWriter``)."""

    def _make_writer(self, path: Path, info: RunInfo):
        from refound_core.inference.writers import GeoPackageWriter

        return GeoPackageWriter(path, info.crs, info.task, kind=info.kind, provenance=info.provenance,
                                classes=info.classes)


class GeoParquetSink(_FileSink):
    """Region embeddings to GeoParquet (``writers.GeoParquetWriter``)."""

    def _make_writer(self, path: Path, info: RunInfo):
        from refound_core.inference.writers import GeoParquetWriter

        return GeoParquetWriter(path, info.crs, info.hidden_size, tuple(info.embeddings), info.provenance)


def sink_for_request(request) -> ResultSink:
    """The file sink a request's ``out`` names (``.parquet`` for ``embed``, else ``.gpkg``)."""
    return GeoParquetSink(request.out) if request.task == "embed" else GeoPackageSink(request.out)
