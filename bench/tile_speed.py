"""Tiling speed: patches/s of `vstain tile` against a raw tifffile read of the same regions.

    python bench/tile_speed.py [--size 4096] [--slides 2] [--channels 26]

The raw baseline decodes, with tifffile's own codecs, exactly the TIFF
segments (AF and H&E) that the kept patches touch, each once, and does
nothing else: the limit for this path. Runs `tile` with 1 and 2 workers.
Page cache is warm for both (each is run after a warm-up read).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import tifffile

from vstain_cli.data.manifest import read_pairs
from vstain_cli.data.store import read_index


def raw_read(pairs_csv: Path, index: list[dict], size: int) -> float:
    """Seconds to decode every segment the patches touch, with tifffile alone."""
    by_slide: dict[str, list[tuple[int, int]]] = {}
    for r in index:
        by_slide.setdefault(r["slide_id"], []).append((r["x"], r["y"]))
    t = time.perf_counter()
    for pair in read_pairs(pairs_csv):
        for path in (pair.af, pair.he):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                th, tw = page.tilelength, page.tilewidth
                ntx = -(-page.imagewidth // tw)
                need = set()
                for x, y in by_slide.get(pair.slide_id, []):
                    for ty in range(y // th, (y + size - 1) // th + 1):
                        for tx in range(x // tw, (x + size - 1) // tw + 1):
                            need.add(ty * ntx + tx)
                fh = tif.filehandle
                decode = page.decode
                for i in sorted(need):
                    fh.seek(page.dataoffsets[i])
                    decode(fh.read(page.databytecounts[i]), i, jpegtables=page.jpegtables)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--channels", type=int, default=26)
    ap.add_argument("--pairs", type=Path, help="use these slide pairs instead of making phantoms")
    args = ap.parse_args()
    from vstain_cli.data.synth.render import synth
    from vstain_cli.data.tiling import TileOptions, tile

    tmp = Path(tempfile.mkdtemp(prefix="vstain-bench-"))
    try:
        pairs = args.pairs or synth(tmp / "p", slides=args.slides, size=(args.size, args.size), channels=args.channels)
        tile(pairs, tmp / "warm", TileOptions())  # warm the page cache
        index = read_index(tmp / "warm")
        n = len(index)
        raw = min(raw_read(pairs, index, 128) for _ in range(2))
        print(f"tile: {n} patches of 128 px, {args.channels} AF channels, {os.cpu_count()} CPUs")
        print(f"  raw tifffile decode of the same segments  {n / raw:9.0f} patches/s")
        for workers in (1, 2):
            best = None
            for rep in range(2):
                out = tmp / f"w{workers}-{rep}"
                t = time.perf_counter()
                tile(pairs, out, TileOptions(), workers=workers)
                dt = time.perf_counter() - t
                best = dt if best is None else min(best, dt)
                shutil.rmtree(out)
            print(f"  vstain tile --workers {workers}                   {n / best:9.0f} patches/s"
                  f"   ratio to raw {raw / best:5.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
