"""ReFound model backend: data layer, model, pre-training objectives, inference, server.

Dependency rule: this package never imports qgis, PyQt or ``training``
(tests/test_dependency_rule.py proves it).
"""
__version__ = "0.1.0"
