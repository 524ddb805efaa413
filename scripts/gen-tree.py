#!/usr/bin/env python3
"""gen-tree.py - deterministic synthetic trees for treeswap's tests and benchmarks.

Usage:
  gen-tree.py --entries N --seed S [--special] DIR
      Create DIR (must not exist, or be empty) holding exactly N entries below it:
      about 7% directories with a heavy-tailed fan-out like a real OS (a few
      directories with thousands of entries, most with a handful), 85% regular files
      (mostly tiny: median ~400 bytes, mean ~1.5 KiB, a few up to 512 KiB; about 2%
      empty; about 5% duplicates of earlier contents), 7% symlinks (relative,
      absolute, a few dangling), 0.5% extra hardlinks to earlier files, various modes
      (0644, 0755, 0600, 0444, setuid/setgid, sticky dirs), some non-root owners
      (only when run as root), and a few awkward names (spaces, UTF-8, non-UTF-8
      bytes, newlines). --special adds a few fifos and, as root, device nodes.
      1 000 000 entries take about a minute and ~1.3 GB.

  gen-tree.py --mutate PERCENT --seed S DIR
      Change about PERCENT% of DIR's entries in place, deterministically for a given
      tree and seed: content edits (rewrite, append, truncate), mode changes, symlink
      retargets, removals, and new files and directories.

The same arguments always give the same tree (names, contents, modes, links);
timestamps are whatever the clock says.
"""
import argparse
import math
import os
import random
import stat
import sys

IS_ROOT = os.geteuid() == 0

SYLLABLES = [b"ab", b"ac", b"al", b"an", b"ar", b"at", b"ba", b"be", b"bi", b"bo", b"ca",
             b"ce", b"ci", b"co", b"da", b"de", b"di", b"do", b"el", b"en", b"er", b"es",
             b"fa", b"fi", b"ga", b"ge", b"go", b"ha", b"he", b"in", b"is", b"ka", b"ke",
             b"la", b"le", b"li", b"lo", b"lu", b"ma", b"me", b"mi", b"mo", b"na", b"ne",
             b"ni", b"no", b"on", b"or", b"pa", b"pe", b"pi", b"po", b"ra", b"re", b"ri",
             b"ro", b"ru", b"sa", b"se", b"si", b"so", b"ta", b"te", b"ti", b"to", b"tu",
             b"un", b"ur", b"va", b"ve", b"vi", b"xa", b"ya", b"ze", b"zo"]
EXTS = [b"", b"", b"", b".so", b".so.1", b".h", b".c", b".py", b".pm", b".gz", b".conf",
        b".txt", b".html", b".json", b".mo", b".png", b".list", b".md5sums", b".service"]
DIR_SUFFIX = [b"", b"", b"", b".d", b"-1.0", b"_data", b"lib", b"-dev"]
# Rare names that trip up careless code; used for about 1 in 2 000 entries.
ODD = [b"with space", b"tab\there", b"new\nline", b"caf\xc3\xa9", b"\xe6\x97\xa5\xe6\x9c\xac",
       b"bad\xff\xfe", b"latin1-\xe9", b"-leading-dash", b".hidden", b"..dots", b"a" * 200,
       b"back\\slash", b"quote'\"", b"star*?[x]"]


def word(rng, parts):
    return b"".join(rng.choice(SYLLABLES) for _ in range(parts))


def file_size(rng):
    """Mostly tiny, long tail: log-uniform inside each bucket."""
    r = rng.random()
    if r < 0.02:
        return 0
    if r < 0.60:
        lo, hi = 1, 512
    elif r < 0.90:
        lo, hi = 512, 2048
    elif r < 0.98:
        lo, hi = 2048, 8192
    elif r < 0.999:
        lo, hi = 8192, 32768
    else:
        lo, hi = 32768, 524288
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def file_mode(rng):
    r = rng.random()
    if r < 0.80:
        return 0o644
    if r < 0.93:
        return 0o755
    if r < 0.97:
        return 0o600
    if r < 0.995:
        return 0o444
    if r < 0.998:
        return 0o4755
    return 0o2755


def dir_mode(rng):
    r = rng.random()
    if r < 0.95:
        return 0o755
    if r < 0.98:
        return 0o700
    if r < 0.995:
        return 0o775
    return 0o1777


def owner(rng):
    r = rng.random()
    if r < 0.97:
        return 0, 0
    return rng.choice([(1, 1), (100, 101), (1000, 1000), (0, 42), (65534, 65534)])


class Names:
    """Unique names per directory."""

    def __init__(self):
        self.used = {}

    def take(self, rng, d, base):
        s = self.used.setdefault(d, set())
        name = base
        n = 1
        while name in s or name in (b".", b"..") or not name:
            name = base + b"." + str(n).encode()
            n += 1
        s.add(name)
        return name


def write_file(path, data, mode, ids=(0, 0)):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if data:
            os.write(fd, data)
        # chown before chmod: chown clears setuid/setgid, even for root.
        if IS_ROOT and ids != (0, 0):
            os.fchown(fd, *ids)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def set_owner(path, rng):
    """For symlinks and directories, whose modes a chown does not touch."""
    uid, gid = owner(rng)
    if IS_ROOT and (uid, gid) != (0, 0):
        os.lchown(path, uid, gid)


def generate(top, n, seed, special):
    rng = random.Random(seed)
    top = os.fsencode(top)
    os.makedirs(top, exist_ok=True)
    if os.listdir(top):
        sys.exit(f"gen-tree: {top.decode(errors='replace')} is not empty")
    names = Names()

    n_dirs = int(n * 0.07)
    n_hard = int(n * 0.005)
    n_sym = int(n * 0.07)
    n_special = min(20, n // 1000) if special else 0
    n_files = n - n_dirs - n_hard - n_sym - n_special
    if n_files < 1:
        sys.exit("gen-tree: --entries too small")

    def name_for(d, kind):
        if rng.random() < 0.0005:
            base = rng.choice(ODD)
        elif kind == "dir":
            base = word(rng, rng.randint(1, 4)) + rng.choice(DIR_SUFFIX)
        else:
            base = word(rng, rng.randint(1, 5)) + rng.choice(EXTS)
        return names.take(rng, d, base)

    # Directories: each new one hangs below a uniformly chosen earlier one or, half
    # the time, that one's parent, which keeps the depth near a real OS's (4-8).
    dirs = [b""]          # relative paths, b"" is the top
    parent = [-1]
    for _ in range(n_dirs):
        p = rng.randrange(len(dirs))
        if parent[p] >= 0 and rng.random() < 0.5:
            p = parent[p]
        rel = os.path.join(dirs[p], name_for(p, "dir")) if dirs[p] else name_for(p, "dir")
        dirs.append(rel)
        parent.append(p)
        os.mkdir(os.path.join(top, rel), dir_mode(rng) | 0o700)

    # Heavy-tailed weights: a few directories get thousands of entries.
    cum = []
    acc = 0.0
    for _ in dirs:
        acc += min(rng.paretovariate(1.1), 5000.0)
        cum.append(acc)
    file_dirs = sorted(rng.choices(range(len(dirs)), cum_weights=cum, k=n_files))

    files = []            # relative paths of regular files
    recent = []           # contents to duplicate
    for di in file_dirs:
        rel = os.path.join(dirs[di], name_for(di, "file")) if dirs[di] else name_for(di, "file")
        if recent and rng.random() < 0.05:
            data = rng.choice(recent)
        else:
            data = rng.randbytes(file_size(rng))
            if len(data) <= 4096:
                if len(recent) < 2000:
                    recent.append(data)
                else:
                    recent[rng.randrange(2000)] = data
        write_file(os.path.join(top, rel), data, file_mode(rng), owner(rng))
        files.append(rel)

    for _ in range(n_hard):
        src = rng.choice(files)
        di = rng.randrange(len(dirs))
        rel = os.path.join(dirs[di], name_for(di, "file")) if dirs[di] else name_for(di, "file")
        os.link(os.path.join(top, src), os.path.join(top, rel))

    for _ in range(n_sym):
        di = rng.randrange(len(dirs))
        rel = os.path.join(dirs[di], name_for(di, "link")) if dirs[di] else name_for(di, "link")
        r = rng.random()
        tgt = rng.choice(files)
        if r < 0.6:
            target = os.path.relpath(tgt, dirs[di] or b".")
        elif r < 0.95:
            target = b"/" + tgt
        else:
            target = b"../does/not/exist/" + word(rng, 2)
        os.symlink(target, os.path.join(top, rel))
        set_owner(os.path.join(top, rel), rng)

    for i in range(n_special):
        di = rng.randrange(len(dirs))
        rel = os.path.join(dirs[di], name_for(di, "dev")) if dirs[di] else name_for(di, "dev")
        path = os.path.join(top, rel)
        if IS_ROOT and i % 2:
            os.mknod(path, 0o660 | stat.S_IFCHR, os.makedev(rng.randint(1, 10), rng.randint(0, 255)))
        else:
            os.mkfifo(path, 0o644)

    # Directory modes last, so 0500-ish modes could never block the writes above.
    drng = random.Random(seed * 7 + 1)
    for rel in reversed(dirs[1:]):
        path = os.path.join(top, rel)
        os.chmod(path, dir_mode(drng))
        set_owner(path, drng)
    return n


def all_entries(top):
    """Sorted relative paths of every entry below top (deterministic order)."""
    out = []
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(top, rel) if rel else top) as it:
            for e in sorted(it, key=lambda e: e.name):
                crel = os.path.join(rel, e.name) if rel else e.name
                out.append((crel, e.is_dir(follow_symlinks=False),
                            e.is_symlink(), e.is_file(follow_symlinks=False)))
                if out[-1][1]:
                    stack.append(crel)
    out.sort()
    return out


def mutate(top, percent, seed):
    rng = random.Random(seed)
    top = os.fsencode(top)
    entries = all_entries(top)
    k = max(1, round(len(entries) * percent / 100.0))
    chosen = sorted(rng.sample(range(len(entries)), min(k, len(entries))))
    counts = {}
    names = Names()

    def bump(what):
        counts[what] = counts.get(what, 0) + 1

    for i in chosen:
        rel, is_dir, is_link, is_file = entries[i]
        path = os.path.join(top, rel)
        r = rng.random()
        if is_file:
            if r < 0.55:
                data = rng.randbytes(file_size(rng))
                mode = stat.S_IMODE(os.lstat(path).st_mode)
                os.chmod(path, 0o600)  # writable even when 0444 and not root
                # Rewrite in place (hardlinked names see the change too) - as an
                # editor that truncates would, not a rename.
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.chmod(path, mode)
                bump("content rewritten")
            elif r < 0.75:
                mode = stat.S_IMODE(os.lstat(path).st_mode)
                os.chmod(path, 0o600)
                if r < 0.70:
                    with open(path, "ab") as f:
                        f.write(rng.randbytes(rng.randint(1, 300)))
                    bump("appended")
                else:
                    os.truncate(path, os.lstat(path).st_size // 2)
                    bump("truncated")
                os.chmod(path, mode)
            elif r < 0.88:
                os.chmod(path, file_mode(rng))
                bump("mode changed")
            else:
                os.unlink(path)
                bump("removed")
        elif is_link:
            if r < 0.7:
                os.unlink(path)
                os.symlink(b"retargeted/" + word(rng, 3), path)
                bump("symlink retargeted")
            else:
                os.unlink(path)
                bump("removed")
        elif is_dir:
            if r < 0.3:
                os.chmod(path, dir_mode(rng) | 0o700)
                bump("dir mode changed")
            elif r < 0.6 and not os.listdir(path):
                os.rmdir(path)
                bump("removed")
            else:
                # Add a few entries to this directory.
                for _ in range(rng.randint(1, 3)):
                    nm = names.take(rng, rel, b"new-" + word(rng, 3) + rng.choice(EXTS))
                    p = os.path.join(path, nm)
                    if os.path.lexists(p):
                        continue
                    if rng.random() < 0.1:
                        os.mkdir(p, 0o755)
                        write_file(os.path.join(p, b"inner"), rng.randbytes(file_size(rng)), 0o644)
                    else:
                        write_file(p, rng.randbytes(file_size(rng)), file_mode(rng))
                    bump("added")
        else:
            os.chmod(path, 0o600)
            bump("special mode changed")
    return len(entries), counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, required=True)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--entries", type=int, metavar="N")
    g.add_argument("--mutate", type=float, metavar="PERCENT")
    ap.add_argument("--special", action="store_true", help="also make fifos and device nodes")
    a = ap.parse_args()
    if a.entries is not None:
        n = generate(a.dir, a.entries, a.seed, a.special)
        print(f"gen-tree: created {n} entries in {a.dir} (seed {a.seed})")
    else:
        total, counts = mutate(a.dir, a.mutate, a.seed)
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        print(f"gen-tree: mutated {a.dir} ({total} entries before, seed {a.seed}): {summary}")


if __name__ == "__main__":
    main()
