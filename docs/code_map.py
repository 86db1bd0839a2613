"""Print the README's map of the code, or write it into the README.

    python docs/code_map.py                    # print the map (markdown)
    python docs/code_map.py --write README.md  # replace the text between the markers

    python docs/code_map.py --lines            # with each module's line count (not for the README)

The map has one line per package (its folder and the first sentence of its `__init__`
docstring) and under it one line per module: its path and the first sentence of its
docstring. So a module's first sentence is its entry in the README: make it a summary.
Standard library only, and it imports nothing from rlpost (it reads the files), so it
runs before anything is installed.
tests/test_architecture.py checks that the README's map equals this output.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("rlpost", "algorithms", "rewards")  # installed as rlpost, rlpost.algorithms, rlpost.rewards
START, END = "<!-- code-map:start -->", "<!-- code-map:end -->"


def summary(path: Path) -> str:
    """The first sentence of the file's docstring ("" without one)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path))) or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def _entry(label: str, doc: str) -> str:
    return f"{label} — {doc}" if doc else label


def code_map(root: Path = ROOT, counts: bool = False) -> str:
    """The markdown map of FOLDERS under `root`: packages in path order, modules sorted by name."""
    lines = []
    for top in FOLDERS:
        folders = sorted({p.parent for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts})
        for folder in folders:
            rel = folder.relative_to(root).as_posix()
            init = folder / "__init__.py"
            lines.append("- " + _entry(f"**`{rel}/`**", summary(init) if init.exists() else ""))
            for module in sorted(folder.glob("*.py")):
                if module.name == "__init__.py":
                    continue
                label = f"`{rel}/{module.name}`"
                if counts:
                    label += f" ({len(module.read_text(encoding='utf-8').splitlines())} lines)"
                lines.append("  - " + _entry(label, summary(module)))
    return "\n".join(lines) + "\n"


def splice(text: str, new_map: str) -> str:
    """`text` with the part between the markers replaced by `new_map`; ValueError without markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} markers (in this order)")
    return text[: start + len(START)] + "\n" + new_map + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write",
        metavar="README",
        type=Path,
        help="replace the text between the code-map markers in this file",
    )
    parser.add_argument("--lines", action="store_true", help="add each module's line count")
    args = parser.parse_args(argv)
    new_map = code_map(counts=args.lines)
    if args.write is None:
        sys.stdout.write(new_map)
        return 0
    try:
        text = args.write.read_text(encoding="utf-8")
        args.write.write_text(splice(text, new_map), encoding="utf-8")
    except (OSError, ValueError) as e:
        print(f"{args.write}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
