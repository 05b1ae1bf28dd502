"""Write one benchmark's section of benchmarks/RESULTS.md between its markers, leaving the rest alone."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace the text between `name`'s markers (append the section if it is not there yet), atomically."""
    from onnxpipe.atomic import write_bytes

    begin, end = markers(name)
    section = f"{begin}\n{body.strip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    write_bytes(path, new.encode())
