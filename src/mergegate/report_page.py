"""The page, the tables and the pictures every report is written with (the release report, the search report,
the demo's summary): one style, and every cell escaped here, once — a `|` or a line break in a name or an answer
never breaks a markdown table, and no text reaches HTML unescaped.

The pictures need matplotlib (the `report` extra); without it `pyplot()` says so and reports are written without
them."""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from typing import Any, Iterable, Sequence

from ._extras import install_hint, missing_extra

# No fixed widths: the page follows the window; a table wider than the window scrolls inside its own box.
# Printed, every box shows everything: reasons unfolded, nothing scrolled away.
STYLE = """*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em 1.5em;max-width:1400px;line-height:1.4;color:#222}
h1,h2,p,li,summary,.reasons{overflow-wrap:anywhere}
h1{font-size:1.5em;margin:.3em 0}h2{font-size:1.2em;margin:1.2em 0 .4em}
.scroll{overflow-x:auto;max-width:100%;margin:.5em 0}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eee}td.num{text-align:right;white-space:nowrap}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
tr.promote>td.decision{background:#d9f2d9}tr.hold>td.decision{background:#fff2cc}
tr.reject>td.decision{background:#f8d0d0}tr.default>td{background:#f3f3f3}
.tolerated{font-weight:600;color:#8a4b00}
.verdict{font-size:1.1em;font-weight:600}
tr.why>td{background:#fafafa;font-size:12px;border-top:none}
summary{cursor:pointer;color:#444}
@media print{
 body{max-width:none;padding:0}
 .scroll{overflow:visible}
 details::details-content{content-visibility:visible;display:block}
 summary{list-style:none}
 img,tr{break-inside:avoid}
}"""

# Reasons unfold for printing in browsers without ::details-content.
PRINT_SCRIPT = ("<script>addEventListener('beforeprint',()=>document.querySelectorAll('details')"
                ".forEach(d=>d.open=true))</script>")


def html_page(title: str, body: str) -> str:
    """A complete, self-contained page in the reports' style."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style>{PRINT_SCRIPT}</head><body>\n{body}\n</body></html>")


# ---- markdown --------------------------------------------------------------------------------------------------

_PIPE = re.compile(r"(\\*)\|")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def markdown_cell(text: str) -> str:
    """`text` as one cell of a markdown table: a `|` escaped (and any backslashes before it, which would
    otherwise escape the escape), a line break written as `<br>`."""
    return _LINE_BREAK.sub("<br>", _PIPE.sub(lambda m: m.group(1) * 2 + "\\|", text))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines, every cell escaped."""
    line = lambda cells: "| " + " | ".join(map(markdown_cell, cells)) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


# ---- html ------------------------------------------------------------------------------------------------------

def html_cells(cells: Sequence[str], tag: str = "td", classes: dict[int, str] | None = None) -> str:
    """The cells of one row, escaped; `classes`: column index → class attribute."""
    classes = classes or {}
    attribute = lambda i: f' class="{classes[i]}"' if classes.get(i) else ""  # noqa: E731
    return "".join(f"<{tag}{attribute(i)}>{html.escape(c)}</{tag}>" for i, c in enumerate(cells))


def html_table_around(header: Sequence[str], rows_html: str) -> str:
    """A table (in a box that scrolls when wider than the window) with `header` and rows already written as
    `<tr>` elements (with `html_cells`)."""
    return f'<div class="scroll"><table><tr>{html_cells(header, "th")}</tr>{rows_html}</table></div>'


def html_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of plain rows, every cell escaped."""
    return html_table_around(header, "".join(f"<tr>{html_cells(row)}</tr>" for row in rows))


# ---- pictures --------------------------------------------------------------------------------------------------

def html_img(png: bytes, alt: str) -> str:
    """A PNG embedded in the page."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def pyplot(say_missing: bool = True) -> Any | None:
    """pyplot on the Agg backend, or None when matplotlib is not installed (logged with `say_missing`)."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if missing_extra(exc) != "report":
            raise
        if say_missing:
            logging.getLogger(__name__).warning("mergegate: report written without its chart (matplotlib is not "
                                                "installed): %s", install_hint("report"))
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, plt: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
