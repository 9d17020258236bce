#!/usr/bin/env python3
"""Writes a realistic, reproducible raw disk image for the convert benchmark.

The layout is drawn from a fixed seed, so every run on every machine produces the same
bytes: holes, zero blocks written as data (what a filesystem leaves after deleting files on
a thick disk), incompressible runs (already-compressed files), compressible runs (text and
binaries), and runs that are mostly zero with a few bytes set (sparse tables), with extent
sizes from 4 KiB to 8 MiB, log-uniform.

Usage: gen_disk.py PATH [SIZE_GIB] [SEED]
"""

import os
import random
import sys

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def main():
    path = sys.argv[1]
    size = int(float(sys.argv[2]) * GIB) if len(sys.argv) > 2 else 4 * GIB
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 20261126
    rng = random.Random(seed)
    # Incompressible bytes are sliced from one seeded pool: generating 1.5 GiB of
    # seeded random bytes one by one would take minutes, and zero detection cannot tell.
    pool = rng.randbytes(64 * MIB)
    text = b"".join(
        b"line %08d: the quick brown fox jumps over the lazy dog %s\n" % (i, b"x" * (i % 23))
        for i in range(4096)
    )

    kinds = ["hole", "zero", "random", "text", "sparse"]
    weights = [25, 12, 30, 23, 10]
    counts = dict.fromkeys(kinds, 0)
    with open(path, "wb") as f:
        f.truncate(size)
        offset = 0
        while offset < size:
            # Log-uniform length between 4 KiB and 8 MiB, in 4 KiB units.
            length = int(4 * KIB * 2 ** rng.uniform(0, 11)) // (4 * KIB) * (4 * KIB)
            length = max(4 * KIB, min(length, size - offset))
            kind = rng.choices(kinds, weights)[0]
            counts[kind] += length
            if kind == "zero":
                f.seek(offset)
                f.write(bytes(length))
            elif kind == "random":
                start = rng.randrange(0, len(pool) - length) if length < len(pool) else 0
                f.seek(offset)
                f.write(pool[start : start + length])
            elif kind == "text":
                start = rng.randrange(0, len(text))
                reps = (length + len(text)) // len(text) + 1
                f.seek(offset)
                f.write((text * reps)[start : start + length])
            elif kind == "sparse":
                buf = bytearray(length)
                for _ in range(length // (16 * KIB) + 1):
                    buf[rng.randrange(0, length)] = rng.randrange(1, 256)
                f.seek(offset)
                f.write(bytes(buf))
            offset += length
    for kind in kinds:
        if counts[kind]:
            print(f"{kind:>7}: {counts[kind] / MIB:9.1f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
