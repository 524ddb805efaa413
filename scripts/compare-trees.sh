#!/bin/bash
# compare-trees.sh - compare two directory trees entry by entry, independently of treeswap.
#
# Usage:
#   compare-trees.sh [--mtime] [--flags] [--max-diffs N] A B
#   compare-trees.sh --save SNAPSHOT DIR
#
# A and B are directories or snapshot files written by --save (so a tree can be
# compared with itself at an earlier time). For every path below A and B, and for
# the top directory itself, compares: file type, permission bits including
# setuid/setgid/sticky, uid, gid, size (not of directories), sha256 of regular
# files, symlink target, device major/minor, every xattr (all namespaces visible
# to the caller, like `getfattr -d -m - -e hex`), and hardlink groups: files that
# are hardlinked together in A must be hardlinked together in B (not the reverse,
# since treeswap joins identical files). Timestamps are ignored unless --mtime is
# given (then the mtime of every entry, directories included, must match too).
# --flags also compares inode flags (chattr/lsattr: i, a, d, A, s, u, c, S, j, t,
# D, T, C, P) of regular files and directories; off by default because treeswap
# marks its pool objects immutable, so its trees legitimately differ from sources.
# Sockets are ignored (treeswap skips them).
#
# Names are handled as bytes, so newlines and non-UTF-8 bytes are fine; they are
# printed with Python's bytes escapes.
#
# Exit status: 0 and "trees identical: N entries" if equal; 1 with one line per
# difference if not; 2 on usage or I/O errors.
set -euo pipefail

exec python3 - "$@" <<'PY'
import array, fcntl, hashlib, json, os, stat, sys

FS_IOC_GETFLAGS = 0x80086601
# Flags a user sets; leaves out ones the file system manages (extents, htree, inline).
FLAG_NAMES = [(0x1, "s"), (0x2, "u"), (0x4, "c"), (0x8, "S"), (0x10, "i"), (0x20, "a"),
              (0x40, "d"), (0x80, "A"), (0x4000, "j"), (0x8000, "t"), (0x10000, "D"),
              (0x20000, "T"), (0x800000, "C"), (0x20000000, "P")]

def inode_flags(path):
    """lsattr-style letters of a regular file or directory (never opens devices)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        buf = array.array("i", [0, 0])
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        except OSError:
            return "?"
    finally:
        os.close(fd)
    return "".join(n for bit, n in FLAG_NAMES if buf[0] & bit) or "-"

def usage(msg=None):
    if msg:
        print(f"compare-trees: {msg}", file=sys.stderr)
    print("usage: compare-trees.sh [--mtime] [--flags] [--max-diffs N] A B\n"
          "       compare-trees.sh --save SNAPSHOT DIR", file=sys.stderr)
    sys.exit(2)

def show(p):
    """A path for humans: bytes escapes for anything not printable ASCII."""
    if p == b"":
        return "."
    s = repr(p)[2:-1]          # strip b'...'
    return s

TYPES = [(stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
         (stat.S_ISCHR, "chardev"), (stat.S_ISBLK, "blockdev"), (stat.S_ISFIFO, "fifo"),
         (stat.S_ISSOCK, "socket")]

def ftype(mode):
    for test, name in TYPES:
        if test(mode):
            return name
    return "unknown"

def sha256(path):
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest()

def xattrs(path):
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        out[name] = os.getxattr(path, name, follow_symlinks=False).hex()
    return out

def record(path, st):
    """Everything that is compared about one entry, as JSON-friendly values."""
    t = ftype(st.st_mode)
    r = {"type": t, "perm": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
         "xattrs": xattrs(path), "mtime": st.st_mtime_ns}
    if t in ("file", "dir"):
        r["flags"] = inode_flags(path)
    if t == "file":
        r["size"] = st.st_size
        r["sha256"] = sha256(path)
        r["ino"] = st.st_ino
    elif t == "symlink":
        r["target"] = os.readlink(path).hex()
        r["ino"] = st.st_ino
    elif t in ("chardev", "blockdev"):
        r["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        r["ino"] = st.st_ino
    elif t == "fifo":
        r["ino"] = st.st_ino
    return r

def scan(top):
    """Map relative path (bytes, b'' for the top) -> record. Does not follow symlinks."""
    top = os.fsencode(top)
    entries = {}
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode):
        raise SystemExit(f"compare-trees: {show(top)} is not a directory")
    entries[b""] = record(top, st)
    stack = [b""]
    while stack:
        rel = stack.pop()
        d = os.path.join(top, rel) if rel else top
        with os.scandir(d) as it:
            for e in it:
                crel = os.path.join(rel, e.name) if rel else e.name
                cst = e.stat(follow_symlinks=False)
                if stat.S_ISSOCK(cst.st_mode):
                    continue
                entries[crel] = record(e.path, cst)
                if stat.S_ISDIR(cst.st_mode):
                    stack.append(crel)
    return entries

def load(arg):
    if os.path.isdir(arg):
        return scan(arg)
    with open(arg) as f:
        raw = json.load(f)
    if raw.get("format") != "compare-trees-snapshot-1":
        raise SystemExit(f"compare-trees: {arg} is neither a directory nor a snapshot")
    return {bytes.fromhex(k): v for k, v in raw["entries"].items()}

def main(argv):
    check_mtime = False
    check_flags = False
    max_diffs = 200
    save = None
    args = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--mtime":
            check_mtime = True
        elif a == "--flags":
            check_flags = True
        elif a == "--max-diffs":
            i += 1
            max_diffs = int(argv[i]) if i < len(argv) else usage("--max-diffs needs N")
        elif a == "--save":
            i += 1
            save = argv[i] if i < len(argv) else usage("--save needs a file")
        elif a in ("-h", "--help"):
            usage()
        elif a.startswith("-") and a != "-":
            usage(f"unknown option {a}")
        else:
            args.append(a)
        i += 1

    if save is not None:
        if len(args) != 1:
            usage("--save takes one directory")
        entries = scan(args[0])
        with open(save, "w") as f:
            json.dump({"format": "compare-trees-snapshot-1",
                       "entries": {k.hex(): v for k, v in entries.items()}}, f)
        print(f"saved snapshot of {args[0]}: {len(entries)} entries")
        return 0

    if len(args) != 2:
        usage("need A and B")
    try:
        a = load(args[0])
        b = load(args[1])
    except OSError as e:
        print(f"compare-trees: {e}", file=sys.stderr)
        return 2

    diffs = []
    def diff(path, what):
        diffs.append(f"{show(path)}: {what}")

    for p in sorted(a.keys() - b.keys()):
        diff(p, f"only in A ({a[p]['type']})")
    for p in sorted(b.keys() - a.keys()):
        diff(p, f"only in B ({b[p]['type']})")

    keys = ["type", "perm", "uid", "gid", "size", "sha256", "target", "rdev"]
    if check_mtime:
        keys.append("mtime")
    if check_flags:
        keys.append("flags")
    for p in sorted(a.keys() & b.keys()):
        ra, rb = a[p], b[p]
        if ra["type"] != rb["type"]:
            diff(p, f"type {ra['type']} != {rb['type']}")
            continue
        for k in keys:
            va, vb = ra.get(k), rb.get(k)
            if va != vb:
                if k == "target":
                    va, vb = show(bytes.fromhex(va)), show(bytes.fromhex(vb))
                diff(p, f"{k} {va} != {vb}")
        xa, xb = ra["xattrs"], rb["xattrs"]
        for n in sorted(xa.keys() | xb.keys()):
            if n not in xb:
                diff(p, f"xattr {n} only in A (0x{xa[n]})")
            elif n not in xa:
                diff(p, f"xattr {n} only in B (0x{xb[n]})")
            elif xa[n] != xb[n]:
                diff(p, f"xattr {n} 0x{xa[n]} != 0x{xb[n]}")

    # Hardlink groups of A must stay together in B.
    groups = {}
    for p, r in a.items():
        if "ino" in r:
            groups.setdefault(r["ino"], []).append(p)
    for paths in groups.values():
        if len(paths) < 2:
            continue
        inos = {b[p].get("ino") for p in paths if p in b}
        if len(inos) > 1 or None in inos:
            paths.sort()
            diff(paths[0], "hardlink group split in B: "
                 + ", ".join(f"{show(p)}(ino {b[p].get('ino') if p in b else 'missing'})"
                             for p in paths))

    if diffs:
        for line in diffs[:max_diffs]:
            print(line)
        if len(diffs) > max_diffs:
            print(f"... and {len(diffs) - max_diffs} more")
        print(f"trees differ: {len(diffs)} differences ({len(a)} entries in A, {len(b)} in B)")
        return 1
    print(f"trees identical: {len(a)} entries")
    return 0

sys.exit(main(sys.argv[1:]))
PY
