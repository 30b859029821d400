"""QGIS layer styles (QML text) for ReFound's prediction layers.

Shared by the GeoPackage writer (which embeds the style as the layer's default in the
``layer_styles`` table, so opening the file in QGIS shows a styled map) and by the QGIS plugin
(which applies the same QML to in-memory layers). This module builds plain text: it must never
import torch or qgis, so the plugin can use it without the model stack.

Styles (one rule-based renderer each, so insufficient cells get their own hatched rule):

* ``urban_village`` (binary, paper 5.1.2 UVD): a probability ramp over [0, 1] with a class break
  at 0.5 (the decision threshold): cool colours below, warm colours at or above.
* regressions (``population``, ``commercial``, paper 5.1.2 POP/CAP): a graduated colour ramp over
  quantile class breaks of the predicted values (QGIS's "equal count" mode, robust to the heavy
  right tail of population counts).
* multiclass (a user's own task, e.g. land use from ``refound add-label --stat majority``): one
  colour per class (a qualitative palette) on the predicted class index, labelled with the class
  names the checkpoint stores.
* every style: cells flagged ``sufficient = 0`` (no POIs and no imagery; not predicted) are drawn
  with a transparent, grey-hatched fill so gaps in the input data stay visible.
"""
from __future__ import annotations

import math
import uuid
from typing import Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

PREDICTION_FIELD = "prediction"
SUFFICIENT_FIELD = "sufficient"

# Colour ramps (RGB). Probability: blue-grey below 0.5, orange-red at/above (ColorBrewer RdYlBu
# ends); regressions: viridis (perceptually uniform, colour-blind safe) and YlOrRd for population.
PROBABILITY_RAMP = ((44, 123, 182), (171, 217, 233), (253, 174, 97), (215, 25, 28))
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
YLORRD = ((255, 255, 178), (254, 204, 92), (253, 141, 60), (240, 59, 32), (189, 0, 38))
# Qualitative (ColorBrewer Set3 + Dark2): distinguishable classes, none of them the hatch grey.
QUALITATIVE = ((141, 211, 199), (255, 255, 179), (190, 186, 218), (251, 128, 114), (128, 177, 211),
               (253, 180, 98), (179, 222, 105), (252, 205, 229), (188, 128, 189), (204, 235, 197),
               (255, 237, 111), (27, 158, 119), (217, 95, 2), (117, 112, 179), (231, 41, 138),
               (102, 166, 30), (230, 171, 2), (166, 118, 29))
HATCH_COLOUR = (120, 120, 120)
FILL_ALPHA = 210  # slightly see-through so the basemap shows under the cells

TASK_TITLES = {
    "urban_village": "urban village probability",
    "population": "predicted population",
    "commercial": "predicted commercial activeness",
}


def _rgba(rgb: Sequence[int], alpha: int = FILL_ALPHA) -> str:
    r, g, b = (int(v) for v in rgb)
    return f"{r},{g},{b},{int(alpha)}"


def _fill_symbol(name: str, color: str, style: str = "solid", outline: str = "90,90,90,160",
                 outline_width: float = 0.1) -> str:
    props = {
        "color": color, "style": style, "outline_color": outline, "outline_style": "solid",
        "outline_width": f"{outline_width:g}", "outline_width_unit": "MM", "joinstyle": "bevel",
        "offset": "0,0", "offset_unit": "MM",
    }
    lines = "\n".join(f'          <prop k="{k}" v="{v}"/>' for k, v in props.items())
    return (f'      <symbol alpha="1" clip_to_extent="1" type="fill" name="{name}" force_rhr="0">\n'
            f'        <layer pass="0" class="SimpleFill" locked="0" enabled="1">\n{lines}\n'
            f'        </layer>\n      </symbol>')


def _quoted(field: str) -> str:
    return '"' + field.replace('"', '""') + '"'


def _fmt(v: float) -> str:
    """Break values in filters: full precision (repr) so no value falls between two rules."""
    return repr(float(v))


def _label_number(v: float) -> str:
    a = abs(v)
    if a == 0 or 0.01 <= a < 1e6:
        return f"{v:,.2f}" if a < 100 else f"{v:,.0f}"
    return f"{v:.3g}"


def _interpolate(ramp: Sequence[Sequence[int]], t: float) -> tuple:
    """Colour at ``t`` in [0, 1] along a piecewise-linear ramp."""
    t = min(max(t, 0.0), 1.0) * (len(ramp) - 1)
    i = min(int(t), len(ramp) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(ramp[i], ramp[i + 1]))


def _document(rules: list, symbols: list, title: str) -> str:
    root = "{" + str(uuid.UUID(int=0)) + "}"
    rule_xml = "\n".join(
        f'      <rule key="{{{uuid.uuid5(uuid.NAMESPACE_OID, f"{title}/{i}")}}}" symbol="{i}" '
        f'filter={quoteattr(flt)} label={quoteattr(label)}/>'
        for i, (flt, label) in enumerate(rules))
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.22.16-Białowieża" styleCategories="Symbology">\n'
        '  <renderer-v2 type="RuleRenderer" symbollevels="0" enableorderby="0" forceraster="0">\n'
        f'    <rules key="{root}">\n{rule_xml}\n    </rules>\n'
        "    <symbols>\n" + "\n".join(symbols) + "\n    </symbols>\n"
        "  </renderer-v2>\n"
        "  <blendMode>0</blendMode>\n  <featureBlendMode>0</featureBlendMode>\n"
        "  <layerOpacity>1</layerOpacity>\n"
        f"  <layerGeometryType>2</layerGeometryType>\n"
        f"  <!-- {escape(title)} -->\n"
        "</qgis>\n")


def _insufficient_rule(index: int) -> tuple:
    flt = f"NOT {_quoted(SUFFICIENT_FIELD)}"  # works for boolean and 0/1 integer fields
    label = "insufficient data (no POIs, no imagery): not predicted"
    symbol = _fill_symbol(str(index), _rgba(HATCH_COLOUR, 255), style="b_diagonal",
                          outline=_rgba(HATCH_COLOUR, 200))
    return (flt, label), symbol


def _range_rules(breaks: Sequence[float], colours: Sequence[tuple], field: str, labels=None):
    """Graduated-style rules ``lower < v <= upper`` (first class also includes its lower bound)."""
    q, s = _quoted(field), _quoted(SUFFICIENT_FIELD)
    rules, symbols = [], []
    for i in range(len(breaks) - 1):
        lo, hi = breaks[i], breaks[i + 1]
        op = ">=" if i == 0 else ">"
        flt = f"{s} AND {q} {op} {_fmt(lo)} AND {q} <= {_fmt(hi)}"
        if i == len(breaks) - 2:  # open-ended top class: values above the last break still draw
            flt = f"{s} AND {q} {op} {_fmt(lo)}"
        if i == 0:  # and values below the first break
            flt = f"{s} AND {q} <= {_fmt(hi)}" if len(breaks) > 2 else s
        label = labels[i] if labels else f"{_label_number(lo)} – {_label_number(hi)}"
        rules.append((flt, label))
        symbols.append(_fill_symbol(str(i), _rgba(colours[i])))
    return rules, symbols


def probability_qml(field: str = PREDICTION_FIELD) -> str:
    """Urban-village probability: four classes over [0, 1] with the decision break at 0.5."""
    breaks = (0.0, 0.25, 0.5, 0.75, 1.0)
    labels = ("0.00 – 0.25 unlikely", "0.25 – 0.50 unlikely", "0.50 – 0.75 urban village",
              "0.75 – 1.00 urban village")
    rules, symbols = _range_rules(breaks, PROBABILITY_RAMP, field, labels)
    (flt, label), sym = _insufficient_rule(len(rules))
    return _document(rules + [(flt, label)], symbols + [sym], TASK_TITLES["urban_village"])


def quantile_breaks(values: Iterable[float], classes: int = 5) -> list:
    """Class breaks at equal-count quantiles of the finite ``values`` (deduplicated, >= 2 entries)."""
    vals = sorted(v for v in (float(x) for x in values) if math.isfinite(v))
    if not vals:
        return [0.0, 1.0]
    breaks = []
    for k in range(classes + 1):
        pos = k * (len(vals) - 1) / classes
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(vals) - 1)
        v = vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)
        if not breaks or v > breaks[-1]:
            breaks.append(v)
    if len(breaks) == 1:  # every value equal: one class around it
        breaks = [breaks[0] - 0.5, breaks[0] + 0.5]
    return breaks


def graduated_qml(breaks: Sequence[float], task: str = "population", field: str = PREDICTION_FIELD) -> str:
    """Regression output: graduated colours over ``breaks`` (see :func:`quantile_breaks`)."""
    breaks = [float(b) for b in breaks]
    if len(breaks) < 2 or any(b <= a for a, b in zip(breaks, breaks[1:])):
        raise ValueError(f"class breaks must be >= 2 strictly increasing numbers, got {breaks}")
    ramp = YLORRD if task == "population" else VIRIDIS
    n = len(breaks) - 1
    colours = [_interpolate(ramp, i / max(n - 1, 1)) for i in range(n)]
    rules, symbols = _range_rules(breaks, colours, field)
    (flt, label), sym = _insufficient_rule(len(rules))
    return _document(rules + [(flt, label)], symbols + [sym], TASK_TITLES.get(task, task))


def categorical_qml(classes: Sequence[str], task: str = "classes", field: str = PREDICTION_FIELD) -> str:
    """Multiclass output (the predicted class index): one colour and one legend entry per class;
    palette colours repeat after 18 classes."""
    if not classes:
        raise ValueError("a categorical style needs at least one class")
    q, s = _quoted(field), _quoted(SUFFICIENT_FIELD)
    rules = [(f"{s} AND {q} = {i}", str(name)) for i, name in enumerate(classes)]
    symbols = [_fill_symbol(str(i), _rgba(QUALITATIVE[i % len(QUALITATIVE)])) for i in range(len(classes))]
    (flt, label), sym = _insufficient_rule(len(rules))
    return _document(rules + [(flt, label)], symbols + [sym], TASK_TITLES.get(task, task))


def qml_for_task(task: str, values: Iterable[float] = (), kind: str | None = None,
                 field: str = PREDICTION_FIELD, classes: Sequence[str] | None = None) -> str:
    """The default style of a task's prediction layer.

    ``kind`` (``"binary"``/``"regression"``/``"multiclass"``) overrides the guess from the task
    name, so a head trained by the user on their own labels gets the right style too. A
    multiclass style names its classes by ``classes`` (stored in the checkpoint by ``refound
    finetune``), else ``class 0``, ``class 1``, ... up to the largest predicted index.
    """
    kind = kind or ("binary" if task == "urban_village" else "regression")
    if kind == "binary":
        return probability_qml(field)
    if kind == "multiclass":
        if not classes:
            top = max((int(v) for v in values if math.isfinite(float(v))), default=0)
            classes = [f"class {i}" for i in range(top + 1)]
        return categorical_qml(classes, task, field)
    return graduated_qml(quantile_breaks(values), task, field)
