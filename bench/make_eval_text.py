"""Write the default evaluation text of `orion eval`: plain-text documentation of a few standard
library modules, rendered by pydoc from the docstrings installed with the interpreter (PSF licence,
redistributable). The file is committed; this script says how it was made.

    python bench/make_eval_text.py profiles/eval-python-docs.txt
"""

import pydoc
import sys

MODULES = ["json", "csv", "textwrap", "heapq", "bisect", "fnmatch"]


def main() -> None:
    parts = []
    for name in MODULES:
        module = __import__(name)
        lines = pydoc.plain(pydoc.plaintext.document(module)).splitlines()
        # drop the FILE section: it names where this machine installed Python
        keep = [line for i, line in enumerate(lines) if not (line == "FILE" or (i and lines[i - 1] == "FILE"))]
        parts.append("\n".join(keep))
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write(f"Python {sys.version.split()[0]} standard library documentation (pydoc), PSF licence.\n\n")
        f.write("\n\n".join(parts))


if __name__ == "__main__":
    main()
