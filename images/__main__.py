"""``python -m images build NAME [NAME...]`` / ``python -m images list``.

`build` prints each artifact's path on stdout, progress lines (with elapsed seconds)
on stderr. `list` prints one line per recipe: name, built or not, size, path.
Exit status: 0 on success, the P2VError's exit code on failure, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import images
from images.cache import get_recipe, is_built
from p2v.errors import P2VError

_T0 = time.monotonic()


class _Elapsed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.elapsed = time.monotonic() - _T0
        return True


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Elapsed())
    handler.setFormatter(logging.Formatter("[%(elapsed)7.1fs] %(message)s"))
    logger = logging.getLogger("images")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _disk_usage(path: os.PathLike[str] | str) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a file or of all files under a folder."""
    paths = []
    if os.path.isdir(path):
        for dirpath, _, files in os.walk(path):
            paths += [os.path.join(dirpath, f) for f in files]
    else:
        paths = [os.fspath(path)]
    apparent = allocated = 0
    for p in paths:
        st = os.stat(p)
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return apparent, allocated


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cmd_list() -> int:
    rows = []
    for name in sorted(images.recipes()):
        recipe = get_recipe(name)
        path = images.artifact_path(name)
        stored = path.parent if recipe.entry else path
        if is_built(name):
            apparent, allocated = _disk_usage(stored)
            state, size = "built", f"{_human(allocated)} used / {_human(apparent)}"
        else:
            state, size = "missing", "-"
        rows.append((name, state, size, str(path)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    return 0


def cmd_build(names: list[str]) -> int:
    for name in names:
        get_recipe(name)  # fail on a typo before building anything
    for name in names:
        t0 = time.monotonic()
        path = images.ensure(name)
        logging.getLogger("images").info("%s: ready (%.1fs): %s", name, time.monotonic() - t0, path)
        print(path, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m images", description="Build the p2v test guests.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find in the cache) the named artifacts")
    build.add_argument("names", nargs="+", metavar="NAME")
    sub.add_parser("list", help="list recipes, whether they are built, size and path")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        if args.command == "build":
            return cmd_build(args.names)
        return cmd_list()
    except P2VError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; partial output removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
