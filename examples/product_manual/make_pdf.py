"""Print the kettle's manual (the Markdown pages in manual/) as one PDF, the kind of file users index.

    pip install fpdf2 && python examples/product_manual/make_pdf.py   # rewrites zorblax-k7-manual.pdf

A small renderer for the Markdown the pages use: headings, paragraphs, bullet lists, tables (as rows of
text), **bold**. Deterministic: the same pages give the same bytes (fixed creation date). fpdf2 is needed only
to regenerate the file; lmforge reads PDFs with pypdf.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

HERE = Path(__file__).parent


def _latin1(text: str) -> str:
    """The PDF core fonts cover Latin-1: dashes and curly quotes become their ASCII forms."""
    return text.translate(str.maketrans({"—": "-", "–": "-", "’": "'", "‘": "'", "“": '"', "”": '"'}))


def render(pages: list[Path], out: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(datetime.datetime(2023, 3, 1, tzinfo=datetime.timezone.utc))
    pdf.set_title("Zorblax K7 smart kettle - owner's manual")
    pdf.set_margins(20, 20, 20)
    for page in pages:
        pdf.add_page()
        for block in re.split(r"\n\s*\n", page.read_text(encoding="utf-8").strip()):
            lines = block.splitlines()
            heading = re.match(r"^(#{1,6})\s+(.*)", lines[0])
            if heading:
                pdf.set_font("Helvetica", "B", {1: 17, 2: 13}.get(len(heading.group(1)), 11))
                pdf.multi_cell(0, 8, _latin1(heading.group(2)), new_x="LMARGIN", new_y="NEXT")
                pdf.ln(1)
                continue
            pdf.set_font("Helvetica", "", 10.5)
            if lines[0].startswith("|"):  # a table: one "cell - cell - cell" line per row, the rule dropped
                rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines
                        if not re.fullmatch(r"[|\-\s:]+", line)]
                text = "\n".join(" - ".join(r) for r in rows)
            elif lines[0].startswith("- "):
                text = "\n".join("  * " + line[2:] for line in lines)
            else:
                text = " ".join(lines)
            pdf.multi_cell(0, 5.5, _latin1(text), markdown=True, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    pdf.output(str(out))


def main() -> None:
    out = HERE / "zorblax-k7-manual.pdf"
    render(sorted((HERE / "manual").glob("*.md")), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
