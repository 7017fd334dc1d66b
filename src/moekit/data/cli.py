"""`moekit data build`: build (or copy) a corpus and print its manifest summary."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moekit.data.build import SOURCES, build_corpus, default_cache_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="builtin",
        help="'builtin': the ~15 MB corpus built from pinned sources; 'sample': the small shipped one",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="corpus directory to write (default: <cache>/<source>)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache for corpora and downloads (default: $MOEKIT_DATA_CACHE or data/cache)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="never run pip; use cached downloads or fall back to the sample",
    )
    parser.add_argument(
        "--allow-unpinned",
        action="store_true",
        help="build from local sources even when their digest differs from the pinned one",
    )


def main(args: argparse.Namespace) -> int:
    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    out = args.out if args.out is not None else cache / args.source
    started = time.perf_counter()
    corpus = build_corpus(
        out,
        args.source,
        download_dir=cache / "downloads",
        offline=args.offline,
        allow_unpinned=args.allow_unpinned,
    )
    print(corpus.summary())
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return 0
