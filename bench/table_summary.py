#!/usr/bin/env python3
"""Prints the table of bench/table.sh from its raw results.

Usage: table_summary.py RESULTS CHECKS META

RESULTS has one line per timed run: row label wall_s peak_rss_kib out_blocks user_s sys_s reps rc
(wall and CPU cover `reps` calls; they are divided back to one call here).
"""

import statistics
import sys

NAMES = {
    "raw-qcow2": "raw -> qcow2",
    "qcow2-raw": "qcow2 -> raw",
    "raw-qcow2-zlib": "raw -> qcow2 -c zlib",
    "raw-qcow2-zstd": "raw -> qcow2 -c zstd",
    "zlib-raw": "qcow2 zlib -> raw",
    "zstd-raw": "qcow2 zstd -> raw",
    "vmdkstream-qcow2": "VMDK stream -> qcow2",
    "raw-vmdkstream": "raw -> VMDK stream",
    "vhdx-raw": "VHDX dynamic -> raw",
    "chain-qcow2": "3-qcow2 chain -> qcow2",
    "check": "check qcow2",
    "compare": "compare raw qcow2",
    "map": "map --output=json",
    "info": "info --output=json",
}


def main():
    runs = {}
    order = []
    for line in open(sys.argv[1]):
        row, label, wall, rss, blocks, user, system, reps, rc = line.split()
        reps = int(reps)
        if row not in runs:
            order.append(row)
        runs.setdefault(row, {}).setdefault(label, []).append(
            dict(wall=float(wall) / reps, cpu=(float(user) + float(system)) / reps,
                 rss=int(rss) / 1024, alloc=int(blocks) * 512 / 2**30, rc=int(rc)))
    checks = open(sys.argv[2]).read().splitlines()
    bad = {c.split()[1] for c in checks if not c.startswith("ok ")}
    meta = open(sys.argv[3]).read().strip()

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    def fmt_s(x):
        return f"{x:.3f}" if x >= 0.1 else f"{x * 1000:.1f}ms"

    print(meta)
    print()
    hdr = (f"{'row':<24} {'runs':>4} {'qemu s':>8} {'vdisk s':>8} {'ratio':>6} "
           f"{'qemu cpu':>8} {'vdisk cpu':>9} {'cpu ratio':>9} {'qemu RSS':>9} {'vdisk RSS':>9} "
           f"{'verified':>8}")
    print(hdr)
    for row in order:
        q, v = runs[row].get("qemu-img"), runs[row].get("vdisk-unsafe")
        if not q or not v:
            continue
        qw, vw, qc, vc = med(q, "wall"), med(v, "wall"), med(q, "cpu"), med(v, "cpu")
        print(f"{NAMES.get(row, row):<24} {len(v):>4} {fmt_s(qw):>8} {fmt_s(vw):>8} {vw / qw:>6.2f} "
              f"{fmt_s(qc):>8} {fmt_s(vc):>9} {vc / qc if qc else float('nan'):>9.2f} "
              f"{max(r['rss'] for r in q):>7.1f}Mi {max(r['rss'] for r in v):>7.1f}Mi "
              f"{'NO' if row in bad else 'yes':>8}")
    print()
    print("Floors and extras (median wall s / median CPU s; ratio = wall / qemu-img's wall):")
    hdr = f"{'row':<24} {'measure':<14} {'runs':>4} {'wall s':>8} {'cpu s':>8} {'vs qemu':>7} {'peak RSS':>9} {'out alloc':>10}"
    print(hdr)
    for row in order:
        q = runs[row].get("qemu-img")
        qw = med(q, "wall") if q else float("nan")
        for label, rs in runs[row].items():
            if label in ("vdisk-unsafe",) and row not in ("raw-qcow2-zlib", "raw-qcow2-zstd", "raw-vmdkstream"):
                continue
            if label == "qemu-img" and row not in ("raw-qcow2-zlib", "raw-qcow2-zstd", "raw-vmdkstream"):
                continue
            w = med(rs, "wall")
            alloc = f"{med(rs, 'alloc'):.3f}Gi" if label not in ("floor-read",) and not label.startswith("floor-pigz") and not label.startswith("floor-zstd") else ""
            print(f"{NAMES.get(row, row):<24} {label:<14} {len(rs):>4} {fmt_s(w):>8} {fmt_s(med(rs, 'cpu')):>8} "
                  f"{w / qw:>7.2f} {max(r['rss'] for r in rs):>7.1f}Mi {alloc:>10}")
    if bad:
        print()
        print("Verification failures:")
        for c in checks:
            if not c.startswith("ok "):
                print("  " + c)


if __name__ == "__main__":
    main()
