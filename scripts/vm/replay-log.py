#!/usr/bin/env python3
"""replay-log.py: replay a dm-log-writes log onto an image, flush point by flush point.

Debian ships no replay tool for the kernel's dm-log-writes target (xfstests has replay-log,
not packaged), so this reads the log format of drivers/md/dm-log-writes.c directly:

  sector 0:  struct log_write_super { le64 magic, version, nr_entries; le32 sectorsize; }
  then per entry, in the order the writes reached stable storage:
             one sector: struct log_write_entry { le64 sector, nr_sectors, flags, data_len; }
                         (a mark's text follows the header in the same sector)
             nr_sectors sectors of data (none for a discard, a flush or a mark)

Usage:
  replay-log.py points LOG          print the entry count, then one line per flush point: the
                                    number of entries a replay to that point applies (a
                                    point is the state after a FLUSH or FUA entry, plus the
                                    start, 0, and the end, every entry)
  replay-log.py replay LOG IMAGE FROM TO
                                    apply entries [FROM, TO) to IMAGE (a copy of the device
                                    as it was when logging began); discards are skipped (a
                                    device may keep discarded data), marks only printed
"""
import struct
import sys

MAGIC = 0x6A736677736872
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")


def entries(f):
    f.seek(0)
    magic, version, nr, ssize = SUPER.unpack(f.read(SUPER.size))
    if magic != MAGIC:
        sys.exit(f"replay-log: bad magic {magic:#x}: not a dm-log-writes log")
    if version != 1 or ssize not in (512, 1024, 2048, 4096):
        sys.exit(f"replay-log: unsupported log (version {version}, sector size {ssize})")
    pos = ssize
    for i in range(nr):
        f.seek(pos)
        head = f.read(ssize)
        if len(head) < ssize:
            sys.exit(f"replay-log: the log ends inside entry {i} of {nr}")
        sector, nsec, flags, dlen = ENTRY.unpack_from(head)
        data_at = pos + ssize
        pos = data_at
        if not flags & DISCARD:
            pos += nsec * ssize
        yield i, sector, nsec, flags, dlen, data_at, ssize, head


def main():
    cmd = sys.argv[1]
    with open(sys.argv[2], "rb") as log:
        if cmd == "points":
            points = [0]
            n = 0
            for i, _s, _n, flags, _d, _a, _z, _h in entries(log):
                n = i + 1
                if flags & (FLUSH | FUA):
                    points.append(n)
            if points[-1] != n:
                points.append(n)
            print(n)
            for p in points:
                print(p)
            return 0
        if cmd == "replay":
            image, lo, hi = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
            with open(image, "r+b") as out:
                for i, sector, nsec, flags, dlen, data_at, ssize, head in entries(log):
                    if i >= hi:
                        break
                    if i < lo:
                        continue
                    if flags & MARK:
                        text = head[ENTRY.size:ENTRY.size + dlen].decode(errors="replace")
                        print(f"replay-log: mark {text!r} at entry {i}", file=sys.stderr)
                        continue
                    if flags & DISCARD or nsec == 0:
                        continue
                    log.seek(data_at)
                    out.seek(sector * ssize)
                    left = nsec * ssize
                    while left:
                        chunk = log.read(min(left, 1 << 20))
                        if not chunk:
                            sys.exit(f"replay-log: the log ends inside the data of entry {i}")
                        out.write(chunk)
                        left -= len(chunk)
            return 0
    sys.exit(f"replay-log: unknown command {cmd!r} (points or replay)")


if __name__ == "__main__":
    sys.exit(main())
