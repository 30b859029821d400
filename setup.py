"""Installs the model backend (refound_core) and the headless tools (training).

The QGIS plugin (refound_qgis) is not installed here: it ships as a plugin zip
(scripts/build_plugin_zip.py) and talks to this package in-process or over loopback.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _reqs(name):
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _metadata_version():
    # metadata.txt is the single source of the version (plugin and package agree).
    for line in (HERE / "metadata.txt").read_text().splitlines():
        if line.startswith("version="):
            return line.split("=", 1)[1].strip()
    raise RuntimeError("metadata.txt has no version= line")


pins = _reqs("pins.txt")
core = [r for r in pins if r.split("=")[0].split(">")[0] in
        ("torch", "numpy", "attrs", "transformers", "safetensors", "tqdm", "timm", "torchvision")]
geo = [r for r in pins if r not in core]

setup(
    name="refound",
    version=_metadata_version(),
    description="ReFound (KDD 2024) urban region foundation model: PyTorch backend for the QGIS plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["refound_core", "refound_core.*", "training", "training.*"]),
    package_data={"refound_core": ["styles/*.qml", "resources/*"]},
    install_requires=core,
    extras_require={
        "geo": geo,
        "train": ["matplotlib>=3.6", "tensorboard>=2.14"],
        "teachers": _reqs("teachers.txt"),
        "dev": _reqs("dev.txt"),
    },
    entry_points={"console_scripts": ["refound=training.cli:main"]},
)
