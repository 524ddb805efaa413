#!/usr/bin/env python3
"""Hostile deltas made from a good one, for tests/hostile.rs (and for anyone who wants to
throw them at a treeswap by hand).

    make-hostile-corpus.py GOOD_DELTA BASE_MANIFEST SENTINEL OUTDIR

GOOD_DELTA is a delta made by `treeswap diff`, BASE_MANIFEST the output of `treeswap
manifest` for its base tree, SENTINEL an absolute path outside the state root that a hostile
symlink points at (it must stay untouched). Writes OUTDIR/<case>.delta and OUTDIR/index.tsv,
one line per case:

    case <TAB> expected exit codes (comma-separated, or "ok") <TAB> config <TAB> what it is

`config` is `-` or `no-devices` (apply with `[trust] allow_devices = false`). Standard
library only. Where a case must get past an earlier check to reach the one it aims at, the
hashes are recomputed: blob sha256 and size, and the result's `to_digest` and `to_count`
(with an independent implementation of the tree digest of FORMAT.md).
"""

import hashlib
import io
import lzma
import binascii
import os
import struct
import subprocess
import sys
import tarfile
import tomllib

# A file that the test installs in another tree than the delta's base: a patch may not use it.
FOREIGN_CONTENT = b"secret content that only another installed tree has\n"

TYPE_CODE = {"dir": b"d", "file": b"f", "symlink": b"l", "char": b"c", "block": b"b", "fifo": b"p"}


# --- paths (FORMAT.md, "Paths") ------------------------------------------------------------


def decode_path(s):
    out = bytearray()
    b = s.encode()
    i = 0
    while i < len(b):
        if b[i] == 0x25 and i + 2 < len(b):  # %XX
            out.append(int(b[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(b[i])
            i += 1
    return bytes(out)


def encode_path(p):
    out = []
    s = p.decode("utf-8", errors="surrogateescape")
    for ch in s:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that is not valid UTF-8
            out.append("%%%02X" % (o - 0xDC00))
        elif o < 0x20 or o == 0x7F or ch in '%"\\':
            out.append("%%%02X" % o)
        else:
            out.append(ch)
    return "".join(out)


# --- manifests ------------------------------------------------------------------------------


def entry_from_toml(t):
    e = dict(t)
    e["path"] = decode_path(t["path"])
    if "target" in e:
        e["target"] = decode_path(t["target"])
    return e


def write_entry(e):
    parts = ['path = "%s"' % encode_path(e["path"]), 'type = "%s"' % e["type"]]
    if e["type"] != "symlink":
        parts.append("mode = 0o%o" % e["mode"])
    parts += ["uid = %d" % e["uid"], "gid = %d" % e["gid"]]
    if e["type"] == "file":
        parts += ["size = %d" % e["size"], 'sha256 = "%s"' % e["sha256"]]
    if e["type"] == "symlink":
        parts.append('target = "%s"' % encode_path(e["target"]))
    if e["type"] in ("char", "block"):
        parts += ["major = %d" % e["major"], "minor = %d" % e["minor"]]
    if e.get("xattrs"):
        kv = ", ".join('"%s" = "%s"' % (k, v) for k, v in sorted(e["xattrs"].items()))
        parts.append("xattrs = { %s }" % kv)
    return "{ " + ", ".join(parts) + " }"


def u32(n):
    return struct.pack(">I", n)


def put_bytes(b):
    return u32(len(b)) + b


def tree_digest(entries):
    """FORMAT.md, "Tree digest"."""
    h = hashlib.sha256(b"treeswap-tree-v1\0" + struct.pack(">Q", len(entries)))
    for e in entries:
        buf = put_bytes(e["path"]) + TYPE_CODE[e["type"]]
        mode = 0o777 if e["type"] == "symlink" else e["mode"]
        buf += u32(mode) + u32(e["uid"]) + u32(e["gid"])
        xattrs = sorted((decode_path(k), bytes.fromhex(v)) for k, v in e.get("xattrs", {}).items())
        buf += u32(len(xattrs))
        for k, v in xattrs:
            buf += put_bytes(k) + put_bytes(v)
        if e["type"] == "file":
            buf += struct.pack(">Q", e["size"] % (1 << 64)) + bytes.fromhex(e["sha256"])
        elif e["type"] == "symlink":
            buf += put_bytes(e["target"])
        elif e["type"] in ("char", "block"):
            buf += u32(e["major"]) + u32(e["minor"])
        h.update(buf)
    return h.hexdigest()


def compose(base, d):
    """The result's entries, as `apply::compose` builds them (no checks)."""
    by_path = {e["path"]: e for e in base}
    for p in d["removed"]:
        by_path.pop(p, None)
    for e in d["changed"]:
        by_path[e["path"]] = e
    return [by_path[p] for p in sorted(by_path)]


class Delta:
    def __init__(self, text, blobs):
        t = tomllib.loads(text)
        self.head = {k: t[k] for k in t if k not in ("removed", "changed", "contents")}
        self.removed = [decode_path(p) for p in t["removed"]]
        self.changed = [entry_from_toml(e) for e in t["changed"]]
        self.contents = [dict(c) for c in t["contents"]]
        self.blobs = dict(blobs)  # member name -> bytes
        self.extra_members = []  # (TarInfo, bytes) appended after the blobs
        self.text_override = None

    def copy(self):
        d = Delta.__new__(Delta)
        d.head = dict(self.head)
        d.removed = list(self.removed)
        d.changed = [dict(e) for e in self.changed]
        d.contents = [dict(c) for c in self.contents]
        d.blobs = dict(self.blobs)
        d.extra_members = []
        d.text_override = None
        return d

    def to_toml(self):
        if self.text_override is not None:
            return self.text_override
        out = ["# treeswap delta manifest; see FORMAT.md", "format = %d" % self.head["format"]]
        if "from_version" in self.head:
            out.append('from_version = "%s"' % self.head["from_version"])
        out.append('from_digest = "%s"' % self.head["from_digest"])
        out.append('to_version = "%s"' % self.head["to_version"])
        out.append('to_digest = "%s"' % self.head["to_digest"])
        out.append("to_count = %d" % self.head["to_count"])
        out.append("removed = [")
        out += ['"%s",' % encode_path(p) for p in self.removed]
        out.append("]")
        out.append("changed = [")
        out += [write_entry(e) + "," for e in self.changed]
        out.append("]")
        out.append("contents = [")
        for c in self.contents:
            s = '{ sha256 = "%s", size = %d' % (c["sha256"], c["size"])
            if "data" in c:
                s += ', data = %d' % c["data"]
            s += ', source = "%s"' % c["source"]
            if "base" in c:
                s += ', base = "%s"' % c["base"]
            if "blob_sha256" in c:
                s += ', blob_sha256 = "%s", blob_size = %d' % (c["blob_sha256"], c["blob_size"])
            out.append(s + " },")
        out.append("]")
        return "\n".join(out) + "\n"

    def fix_result(self, base):
        """Recomputes `to_digest` and `to_count` so that the result checks pass."""
        result = compose(base, {"removed": self.removed, "changed": self.changed})
        self.head["to_digest"] = tree_digest(result)
        self.head["to_count"] = len(result)

    def set_blob(self, sha, blob):
        """Replaces the blob of content `sha` and recomputes its hash and size."""
        c = next(c for c in self.contents if c["sha256"] == sha)
        c["blob_sha256"] = hashlib.sha256(blob).hexdigest()
        c["blob_size"] = len(blob)
        self.blobs["blobs/" + sha] = blob

    def members(self):
        text = self.to_toml().encode()
        yield "delta.toml", text
        yield "delta.toml.minisig", b""
        for c in self.contents:
            if c["source"] != "base":
                yield "blobs/" + c["sha256"], self.blobs.get("blobs/" + c["sha256"], b"")

    def to_tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in self.members():
                tar.addfile(member(name, len(data)), io.BytesIO(data))
            for info, data in self.extra_members:
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def member(name, size):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info


def zstd_rle_bomb(total, window_log=17):
    """A zstd frame of `total` zero bytes made of RLE blocks: 4 bytes per 128 KiB of output,
    no declared content size. Written by hand (RFC 8878) to need no zstd library."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out.append(0x00)  # frame header descriptor: no content size, not single segment, no dict
    out.append((window_log - 10) << 3)  # window descriptor: exponent, mantissa 0
    block = 128 << 10
    n = total // block
    for i in range(n):
        last = 1 if i == n - 1 else 0
        header = last | (1 << 1) | (block << 3)  # type 1 = RLE, size = bytes to repeat
        out += struct.pack("<I", header)[:3] + b"\x00"
    return bytes(out)


def main():
    good_path, base_path, sentinel, outdir = sys.argv[1:5]
    # A minisign secret key: cases for a machine with keys configured carry a signature it
    # made of other text, well formed but wrong for them.
    secret_key = sys.argv[5] if len(sys.argv) > 5 else None
    os.makedirs(outdir, exist_ok=True)
    good_bytes = open(good_path, "rb").read()
    if good_bytes[:4] == b"\x28\xb5\x2f\xfd":
        # A zstd-compressed delta (the default): work on its plain tar, also a valid delta.
        good_bytes = subprocess.run(["zstd", "-dc"], input=good_bytes, stdout=subprocess.PIPE,
                                    check=True).stdout
    base_t = tomllib.loads(open(base_path, encoding="utf-8").read())
    base = [entry_from_toml(e) for e in base_t["entries"]]
    base_by_sha = {e["sha256"]: e for e in base if e["type"] == "file"}

    with tarfile.open(fileobj=io.BytesIO(good_bytes)) as tar:
        infos = tar.getmembers()
        data = {i.name: tar.extractfile(i).read() for i in infos}
    good = Delta(data["delta.toml"].decode(), {k: v for k, v in data.items() if k.startswith("blobs/")})
    assert good.to_toml() == data["delta.toml"].decode(), "the writer is not canonical"

    index = []

    def emit(name, payload, codes, what, config="-"):
        if isinstance(payload, Delta):
            payload = payload.to_tar()
        with open(os.path.join(outdir, name + ".delta"), "wb") as f:
            f.write(payload)
        index.append((name, codes, config, what))

    blob_contents = [c for c in good.contents if c["source"] != "base"]
    zstd_c = next(c for c in blob_contents if c["source"] == "zstd")
    patch_c = next(c for c in blob_contents if c["source"] != "zstd")
    file_e = next(e for e in good.changed if e["type"] == "file" and e["sha256"] == zstd_c["sha256"])
    base_file = next(e for e in base if e["type"] == "file")

    # -- truncation at every member boundary (header start, data start, mid data, data end)
    emit("truncated-empty", b"", "8", "zero bytes")
    for i, info in enumerate(infos):
        cuts = {
            "header": info.offset,
            "data": info.offset_data,
            "mid": info.offset_data + info.size // 2,
            "end": info.offset_data + info.size,
        }
        for where, off in cuts.items():
            if off == 0 or (where in ("mid", "end") and info.size == 0):
                continue
            # Cut before the last blob ends: the delta lacks bytes it needs.
            emit("truncated-m%d-%s" % (i, where), good_bytes[:off], "8", "cut at member %d (%s) %s" % (i, info.name, where))
    # Every member complete, without the end-of-archive blocks: nothing is missing.
    last = infos[-1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    emit("truncated-no-end-blocks", good_bytes[:end], "ok", "all members, no end-of-archive zero blocks")

    # -- hostile paths in `changed` and `removed`
    def with_changed_path(p):
        d = good.copy()
        e = dict(file_e)
        e["path"] = p
        d.changed = sorted(d.changed + [e], key=lambda e: e["path"])
        d.fix_result(base)
        return d

    for name, p in [
        ("path-dotdot", b"../escape"),
        ("path-dotdot-inner", b"usr/../../escape"),
        ("path-absolute", b"/tmp/treeswap-escape"),
        ("path-empty", b""),
        ("path-empty-component", b"usr//escape"),
        ("path-dot-component", b"usr/./escape"),
        ("path-trailing-slash", b"usr/escape/"),
        ("path-nul", b"usr/esc\x00ape"),
        ("path-too-long", b"usr/" + b"x" * 5000),
    ]:
        emit(name, with_changed_path(p), "8", "changed entry with path %r" % p[:40])
    for name, p in [("removed-dotdot", b"../etc"), ("removed-absolute", b"/etc"), ("removed-nul", b"etc\x00")]:
        d = good.copy()
        d.removed = sorted(d.removed + [p])
        emit(name, d, "8", "removed path %r" % p)
    d = good.copy()
    d.removed = sorted(d.removed + [b"no/such/path"])
    emit("removed-missing", d, "8", "removes a path the base lacks")
    d = good.copy()
    d.removed = sorted(d.removed + [b"."])
    d.fix_result(base)
    emit("removed-top", d, "8", "removes the top directory")

    # -- a symlink made by the delta, then a file written through it
    d = good.copy()
    link = {"path": b"aaa", "type": "symlink", "uid": 0, "gid": 0, "target": sentinel.encode()}
    through = dict(file_e)
    through["path"] = b"aaa/x"
    d.changed = sorted(d.changed + [link, through], key=lambda e: e["path"])
    d.fix_result(base)
    emit("symlink-then-file-through-it", d, "8", "symlink aaa -> SENTINEL and a file aaa/x")
    # The same, with a directory of the base turned into a symlink while its children stay.
    d = good.copy()
    top_dir = next(e for e in base if e["type"] == "dir" and e["path"] != b"." and b"/" not in e["path"])
    link = {"path": top_dir["path"], "type": "symlink", "uid": 0, "gid": 0, "target": sentinel.encode()}
    d.changed = sorted([e for e in d.changed if e["path"] != top_dir["path"]] + [link], key=lambda e: e["path"])
    d.fix_result(base)
    emit("dir-becomes-symlink-keeping-children", d, "8", "base directory replaced by a symlink to SENTINEL, children kept")
    # A symlink to the sentinel and a new file under the same name in the same delta.
    d = good.copy()
    link = {"path": b"usr/sentinel", "type": "symlink", "uid": 0, "gid": 0, "target": sentinel.encode() + b"/x"}
    dup = dict(file_e)
    dup["path"] = b"usr/sentinel"
    d.changed = sorted(d.changed + [link, dup], key=lambda e: e["path"])
    emit("symlink-and-file-same-path", d, "8", "one path both a symlink to SENTINEL and a file")

    # -- tar members with hostile names or types
    d = good.copy()
    extra = tarfile.TarInfo("../../escape")
    extra.size = 5
    d.extra_members.append((extra, b"evil\n"))
    emit("member-dotdot-after-blobs", d, "8", "a member ../../escape after the last blob")
    raw = bytearray(good_bytes)
    raw[infos[0].offset : infos[0].offset + 100] = b"/delta.toml".ljust(100, b"\0")
    fix_checksum(raw, infos[0].offset)
    emit("member-absolute-manifest", bytes(raw), "8", "first member named /delta.toml")
    raw = bytearray(good_bytes)
    blob_info = next(i for i in infos if i.name.startswith("blobs/"))
    raw[blob_info.offset : blob_info.offset + 100] = ("../" + blob_info.name).encode().ljust(100, b"\0")
    fix_checksum(raw, blob_info.offset)
    emit("member-blob-dotdot", bytes(raw), "8", "a blob member named ../blobs/<sha>")
    raw = bytearray(good_bytes)
    raw[blob_info.offset + 156] = ord("2")  # typeflag: symlink
    raw[blob_info.offset + 157 : blob_info.offset + 257] = sentinel.encode().ljust(100, b"\0")
    fix_checksum(raw, blob_info.offset)
    emit("member-blob-is-symlink", bytes(raw), "8", "a blob member that is a tar symlink to SENTINEL")
    raw = bytearray(good_bytes)
    raw[blob_info.offset + 156] = ord("5")  # typeflag: directory
    fix_checksum(raw, blob_info.offset)
    emit("member-blob-is-directory", bytes(raw), "8", "a blob member that is a tar directory")

    # -- patch bases that are not in the base tree
    foreign = hashlib.sha256(FOREIGN_CONTENT).hexdigest()
    d = good.copy()
    next(c for c in d.contents if c["sha256"] == patch_c["sha256"])["base"] = foreign
    emit("patch-base-in-other-tree", d, "8", "a patch against a content only another installed tree has")
    d = good.copy()
    next(c for c in d.contents if c["sha256"] == patch_c["sha256"])["base"] = hashlib.sha256(b"nowhere").hexdigest()
    emit("patch-base-nowhere", d, "8", "a patch against a content nobody has")
    d = good.copy()
    later = d.contents[-1]["sha256"]
    first_patch = next(c for c in d.contents if c["source"] != "base")
    if first_patch["sha256"] != later:
        first_patch["source"] = "zstd-patch"
        first_patch["base"] = later
        emit("patch-base-later-in-delta", d, "8", "a patch against a content listed later in the delta")
    d = good.copy()
    c = next(c for c in d.contents if c["sha256"] == zstd_c["sha256"])
    c["source"] = "base"
    del c["blob_sha256"], c["blob_size"]
    emit("content-base-not-in-base", d, "8", "source = base for a content the base lacks")
    d = good.copy()
    c = next(c for c in d.contents if c["sha256"] == zstd_c["sha256"])
    c["source"] = "zstd-patch"
    c["base"] = c["sha256"]
    emit("patch-against-itself", d, "8", "a patch whose base is its own content")

    # -- a device node where the config forbids them
    d = good.copy()
    dev = {"path": b"dev", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0}
    node = {"path": b"dev/mem", "type": "char", "mode": 0o666, "uid": 0, "gid": 0, "major": 1, "minor": 1}
    d.changed = sorted(d.changed + [dev, node], key=lambda e: e["path"])
    d.fix_result(base)
    emit("device-node-forbidden", d, "8", "char device dev/mem (1,1) with allow_devices = false", "no-devices")
    d = good.copy()
    node = {"path": b"sda", "type": "block", "mode": 0o660, "uid": 0, "gid": 0, "major": 8, "minor": 0}
    d.changed = sorted(d.changed + [node], key=lambda e: e["path"])
    d.fix_result(base)
    emit("block-node-forbidden", d, "8", "block device sda (8,0) with allow_devices = false", "no-devices")

    # -- enormous declared sizes and counts: nothing may be allocated before the bytes exist
    for name, size in [("size-2p63", 1 << 63), ("size-u64-max", (1 << 64) - 1)]:
        d = good.copy()
        e = next(e for e in d.changed if e["path"] == file_e["path"])
        c = next(c for c in d.contents if c["sha256"] == zstd_c["sha256"])
        e["size"] = c["size"] = size
        d.fix_result(base)
        emit(name, d, "3,9", "a new file declared %d bytes long" % size)
    d = good.copy()
    n = 0
    # Two new files of 2^63 bytes each: their sum overflows a u64.
    sized = []
    for c in d.contents:
        if c["source"] == "base":
            continue
        es = [e for e in d.changed if e["type"] == "file" and e["sha256"] == c["sha256"]]
        if es:
            sized.append((c, es))
    for c, es in sized[:2]:
        c["size"] = 1 << 63
        for e in es:
            e["size"] = 1 << 63
        n += 1
    if n == 2:
        d.fix_result(base)
        emit("size-sum-overflows", d, "3,9", "two new files of 2^63 bytes each (the sum overflows u64)")
    d = good.copy()
    next(c for c in d.contents if c["sha256"] == zstd_c["sha256"])["blob_size"] = 1 << 63
    emit("blob-size-2p63", d, "8", "a blob declared 2^63 bytes long")
    d = good.copy()
    next(c for c in d.contents if c["sha256"] == zstd_c["sha256"])["blob_size"] = (1 << 64) - 1
    emit("blob-size-u64-max", d, "8", "a blob declared 2^64-1 bytes long")
    d = good.copy()
    d.head["to_count"] = (1 << 64) - 1
    emit("to-count-u64-max", d, "8", "to_count = 2^64-1")
    d = good.copy()
    d.head["to_count"] = 1 << 40
    emit("to-count-2p40", d, "8", "to_count = 2^40")
    # A tar header that declares a 2^63-byte manifest (GNU base-256 size field).
    raw = bytearray(good_bytes)
    raw[infos[0].offset + 124 : infos[0].offset + 136] = b"\x80" + (1 << 63).to_bytes(11, "big")
    fix_checksum(raw, infos[0].offset)
    emit("manifest-member-size-2p63", bytes(raw), "8", "delta.toml member declared 2^63 bytes long (base-256)")
    raw = bytearray(good_bytes)
    raw[infos[0].offset + 124 : infos[0].offset + 136] = b"77777777777\0"
    fix_checksum(raw, infos[0].offset)
    emit("manifest-member-size-8g", bytes(raw), "8", "delta.toml member declared 8 GiB long, the stream is short")
    raw = bytearray(good_bytes)
    raw[blob_info.offset + 124 : blob_info.offset + 136] = b"\x80" + ((1 << 64) - 1).to_bytes(11, "big")
    fix_checksum(raw, blob_info.offset)
    emit("blob-member-size-u64-max", bytes(raw), "8", "blob member declared 2^64-1 bytes long (base-256)")
    # The manifest declares a huge blob and the tar header agrees; the bytes are not there.
    d = good.copy()
    next(c for c in d.contents if c["sha256"] == zstd_c["sha256"])["blob_size"] = 1 << 40
    raw = bytearray(d.to_tar())
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as t:
        bi = next(i for i in t.getmembers() if i.name == "blobs/" + zstd_c["sha256"])
    raw[bi.offset + 124 : bi.offset + 136] = b"\x80" + (1 << 40).to_bytes(11, "big")
    fix_checksum(raw, bi.offset)
    emit("blob-1tib-declared-short-stream", bytes(raw), "8", "blob and its header both say 1 TiB; the stream ends")

    # -- compression bombs: a small declared size, a blob that expands to gigabytes
    d = good.copy()
    d.set_blob(zstd_c["sha256"], zstd_rle_bomb(1 << 30))
    emit("zstd-bomb-1g", d, "3,8", "a zstd blob of 32 KiB that expands to 1 GiB of zeros")
    d = good.copy()
    d.set_blob(zstd_c["sha256"], zstd_rle_bomb(1 << 30, window_log=31))
    emit("zstd-bomb-window-2g", d, "3,8", "a zstd blob declaring a 2 GiB window")
    d = good.copy()
    d.set_blob(patch_c["sha256"], zstd_rle_bomb(1 << 30))
    emit("zstd-patch-bomb", d, "3,8", "a zstd-patch blob that expands to 1 GiB")
    d = good.copy()
    c = next(c for c in d.contents if c["sha256"] == patch_c["sha256"])
    c["source"] = "bsdiff"
    d.set_blob(patch_c["sha256"], zstd_rle_bomb(1 << 30))
    emit("bsdiff-bomb", d, "3,8", "a bsdiff blob whose patch stream expands to 1 GiB of zeros")
    d = good.copy()
    c = next(c for c in d.contents if c["sha256"] == patch_c["sha256"])
    c["source"] = "bsdiff"
    # One control triple asking to add 2^62 bytes, then nothing.
    body = struct.pack("<QQQ", 1 << 62, 0, 0)
    d.set_blob(patch_c["sha256"], zstd_frame_raw(body))
    emit("bsdiff-huge-control", d, "3,8", "a bsdiff control triple that adds 2^62 bytes")
    d = good.copy()
    c = next(c for c in d.contents if c["sha256"] == patch_c["sha256"])
    c["source"] = "bsdiff"
    body = struct.pack("<QQQ", 0, 1 << 62, 0)
    d.set_blob(patch_c["sha256"], zstd_frame_raw(body))
    emit("bsdiff-huge-extra", d, "3,8", "a bsdiff control triple that copies 2^62 extra bytes")

    # -- a content's data (the bytes outside its holes): what the free-space check counts
    d = good.copy()
    big_c = max(blob_contents, key=lambda c: c["size"])
    assert big_c["size"] > 8192, "the fixtures need a content of more than two blocks"
    next(c for c in d.contents if c["sha256"] == big_c["sha256"])["data"] = 1
    emit("data-understated", d, "3", "a content of %d bytes declaring 1 byte of data outside holes" % big_c["size"])
    d = good.copy()
    next(c for c in d.contents if c["sha256"] == big_c["sha256"])["data"] = big_c["size"] + 1
    emit("data-over-size", d, "8", "a content declaring more data than its size")

    # -- `xz` blobs (issue 17): a whole content as one .xz stream, decoded with a memory
    # limit of the dictionary its size needs
    def as_xz(sha, blob):
        d = good.copy()
        c = next(c for c in d.contents if c["sha256"] == sha)
        c["source"] = "xz"
        c.pop("base", None)
        d.set_blob(sha, blob)
        return d

    real = good.blobs["blobs/" + zstd_c["sha256"]]
    plain = subprocess.run(["zstd", "-dc"], input=real, stdout=subprocess.PIPE, check=True).stdout
    # The dictionary at most the power of two that covers the content, from 4 KiB (FORMAT.md).
    dict_size = max(4096, 1 << max(0, len(plain) - 1).bit_length())
    good_xz = lzma.compress(plain, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                            filters=[{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dict_size}])
    emit("xz-dict-too-large", as_xz(zstd_c["sha256"], lzma.compress(
        plain, format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 64 << 20}])),
         "8", "an xz blob whose dictionary is larger than its content needs")
    emit("xz-good", as_xz(zstd_c["sha256"], good_xz), "ok", "a whole content as a valid xz blob")
    emit("xz-garbage", as_xz(zstd_c["sha256"], b"\xfd7zXZ\x00" + b"\x55" * 200), "8",
         "an xz blob with a valid magic and garbage after it")
    emit("xz-truncated", as_xz(zstd_c["sha256"], good_xz[: len(good_xz) // 2]), "8",
         "an xz blob cut in half")
    bomb = lzma.compress(bytes(64 << 20), format=lzma.FORMAT_XZ, preset=1)
    emit("xz-bomb", as_xz(zstd_c["sha256"], bomb), "3,8",
         "an xz blob that expands to 64 MiB for a small declared size")
    # The LZMA2 filter's dictionary property set to 40 (4 GiB - 1): a decoder that believed it
    # would reserve 4 GiB. Stream header 12 bytes; the block header then holds its size, flags,
    # the filter id 0x21, properties size 1, the property byte, padding and a CRC32.
    hb = bytearray(good_xz)
    hsize = (hb[12] + 1) * 4
    header = hb[12 : 12 + hsize]
    at = header.index(b"\x21\x01", 2) + 2
    header[at] = 40
    header[-4:] = struct.pack("<I", binascii.crc32(bytes(header[:-4])))
    hb[12 : 12 + hsize] = header
    emit("xz-dict-4g", as_xz(zstd_c["sha256"], bytes(hb)), "3,8",
         "an xz blob whose LZMA2 dictionary is declared as 4 GiB")
    d = as_xz(zstd_c["sha256"], good_xz)
    next(c for c in d.contents if c["sha256"] == zstd_c["sha256"])["base"] = patch_c["sha256"]
    emit("xz-with-base", d, "8", "an xz content that names a patch base (unknown key)")
    d = good.copy()
    c = next(c for c in d.contents if c["sha256"] == patch_c["sha256"])
    c["source"] = "xz"
    emit("xz-patch-blob", d, "8", "a patch's zstd blob declared as xz")

    # -- duplicates and contradictions
    d = good.copy()
    d.changed = sorted(d.changed + [dict(file_e)], key=lambda e: e["path"])
    emit("same-path-twice", d, "8", "one path listed twice in changed")
    d = good.copy()
    e = dict(file_e)
    e2 = {"path": file_e["path"], "type": "dir", "mode": 0o755, "uid": 0, "gid": 0}
    d.changed = sorted([x for x in d.changed if x["path"] != file_e["path"]] + [e, e2], key=lambda e: e["path"])
    emit("file-and-dir-same-path", d, "8", "one path listed as a file and as a directory")
    d = good.copy()
    base_dir = next(e for e in base if e["type"] == "dir" and any(x["path"].startswith(e["path"] + b"/") for x in base if x["type"] == "file") and e["path"] != b".")
    as_file = {"path": base_dir["path"], "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "size": zstd_c["size"], "sha256": zstd_c["sha256"]}
    d.changed = sorted([x for x in d.changed if x["path"] != base_dir["path"]] + [as_file], key=lambda e: e["path"])
    d.fix_result(base)
    emit("dir-becomes-file-keeping-children", d, "8", "a base directory turned into a file, its children kept")
    d = good.copy()
    d.removed = sorted(set(d.removed + [file_e["path"]]))
    if file_e["path"] not in {e["path"] for e in base}:
        d.removed = sorted(set(d.removed + [base_file["path"]]))
        d.changed = sorted(d.changed + [dict(base_file)], key=lambda e: e["path"])
    emit("removed-and-changed", d, "8", "one path both removed and changed")
    d = good.copy()
    d.removed = d.removed + d.removed[:1]
    d.removed.sort()
    emit("removed-twice", d, "8", "one path removed twice")
    d = good.copy()
    d.contents.append(dict(d.contents[0]))
    emit("content-twice", d, "8", "one content listed twice")
    d = good.copy()
    d.changed.reverse()
    emit("changed-unsorted", d, "8", "changed entries not sorted")

    # -- digests and versions
    d = good.copy()
    d.head["to_digest"] = flip_hex(d.head["to_digest"])
    emit("to-digest-mismatch", d, "3", "to_digest does not match the entries")
    d = good.copy()
    d.head["from_digest"] = flip_hex(d.head["from_digest"])
    emit("from-digest-unknown", d, "7", "from_digest of a tree that is not installed")
    d = good.copy()
    d.head["to_version"] = "0.1"
    emit("downgrade", d, "11", "to_version older than current")
    d = good.copy()
    d.head["to_version"] = "../2"
    emit("to-version-dotdot", d, "8", "to_version ../2")
    d = good.copy()
    d.head["to_version"] = "trees"
    emit("to-version-odd-name", d, "ok,8", "to_version `trees` (a legal name)")
    d = good.copy()
    d.head["format"] = 2
    emit("format-2", d, "8", "format = 2")
    d = good.copy()
    d.text_override = good.to_toml() + "to_count = 1\n"
    emit("key-after-sections", d, "3,8", "to_count given again after the sections (last one wins today)")

    # -- blobs that do not match
    d = good.copy()
    d.blobs["blobs/" + zstd_c["sha256"]] = bytes(b ^ 1 for b in d.blobs["blobs/" + zstd_c["sha256"]])
    emit("blob-sha-mismatch", d, "3", "a blob that does not match its blob_sha256")
    d = good.copy()
    other = b"x" * zstd_c["size"]
    d.set_blob(zstd_c["sha256"], zstd_frame_raw(other))
    emit("content-sha-mismatch", d, "3", "a blob that decodes to other bytes of the right size")
    d = good.copy()
    d.set_blob(zstd_c["sha256"], b"this is not zstd")
    emit("blob-not-zstd", d, "8", "a blob that is not a zstd frame")
    d = good.copy()
    d.set_blob(zstd_c["sha256"], zstd_frame_raw(b"short"))
    emit("blob-decodes-short", d, "3,8", "a blob that decodes to fewer bytes than declared")
    d = good.copy()
    blob_order = [c for c in d.contents if c["source"] != "base"]
    if len(blob_order) >= 2:
        raw = d.to_tar()
        with tarfile.open(fileobj=io.BytesIO(raw)) as t:
            ms = t.getmembers()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for m in ms[:2] + [ms[3], ms[2]] + ms[4:]:
                t.addfile(member(m.name, m.size), io.BytesIO(data.get(m.name, b"")))
        emit("blobs-out-of-order", buf.getvalue(), "8", "two blobs swapped")
    d = good.copy()
    d.extra_members.append((member("blobs/" + "0" * 64, 3), b"abc"))
    emit("extra-blob-after-last", d, "8", "an unlisted blob after the last one")
    raw = bytearray(good_bytes)
    raw[infos[1].offset : infos[1].offset + 100] = b"signature".ljust(100, b"\0")
    fix_checksum(raw, infos[1].offset)
    emit("signature-member-renamed", bytes(raw), "8", "second member not named delta.toml.minisig")
    d = good.copy()
    tar = bytearray(d.to_tar())
    emit("garbage-after-end", bytes(tar) + b"\xff" * 1024, "ok,8", "1 KiB of 0xff after the end-of-archive blocks")

    # -- declared and real sizes beyond any memory window (issue 15, item 2): every case
    #    below must run in bounded memory, so the bytes are spooled or streamed, never held
    def emit_big(name, d, blobs, codes, what, config="-"):
        """A zstd-compressed delta whose blob members are (sha, size, pieces factory)."""
        text = d.to_toml().encode()
        members = [("delta.toml", len(text), [text]), ("delta.toml.minisig", 0, [])]
        for c in d.contents:
            if c["source"] == "base":
                continue
            size, pieces = blobs.get(c["sha256"], (None, None))
            if size is None:
                b = d.blobs.get("blobs/" + c["sha256"], b"")
                size, pieces = len(b), lambda b=b: [b]
            members.append(("blobs/" + c["sha256"], size, pieces()))
        write_zstd_tar(os.path.join(outdir, name + ".delta"), members)
        index.append((name, codes, config, what))

    def resize(d, sha, size):
        """Declares content `sha` (and the changed files with it) `size` bytes long."""
        for e in d.changed:
            if e.get("sha256") == sha:
                e["size"] = size
        next(c for c in d.contents if c["sha256"] == sha)["size"] = size
        d.fix_result(base)

    big = 512 << 20
    d = good.copy()
    resize(d, zstd_c["sha256"], big)
    c = next(c for c in d.contents if c["sha256"] == zstd_c["sha256"])
    c["blob_sha256"], c["blob_size"] = sha256_of(zeros(big)), big
    emit_big("blob-512m-spooled", d, {zstd_c["sha256"]: (big, lambda: zeros(big))}, "8",
             "a 512 MiB blob (zeros, its hash right) that is not a zstd frame, in a 30 KB delta")
    d = good.copy()
    resize(d, patch_c["sha256"], big)
    c = next(c for c in d.contents if c["sha256"] == patch_c["sha256"])
    c["source"] = "bsdiff"
    # One record copying 512 MiB, its bytes RLE runs of zeros: a 16 KB blob.
    body = bytearray(struct.pack("<I", 0xFD2FB528)) + bytes([0x00, (17 - 10) << 3])
    body += struct.pack("<I", 0 | (0 << 1) | (24 << 3))[:3] + struct.pack("<QQQ", 0, big, 0)
    body += zstd_rle_bomb(big)[6:]
    d.set_blob(patch_c["sha256"], bytes(body))
    emit("bsdiff-512m-output", d, "3", "a 16 KB bsdiff blob whose patch copies 512 MiB of zeros (size declared)")
    d = good.copy()
    resize(d, zstd_c["sha256"], 1 << 30)
    d.set_blob(zstd_c["sha256"], zstd_rle_bomb(1 << 30, window_log=26))
    emit("zstd-window-64m-1g", d, "3", "a zstd blob with the largest window allowed (64 MiB) giving 1 GiB of zeros (size declared)")
    d = good.copy()
    resize(d, zstd_c["sha256"], 1 << 30)
    d.set_blob(zstd_c["sha256"], zstd_rle_bomb(1 << 30, window_log=27))
    emit("zstd-window-128m", d, "8", "a zstd blob declaring a 128 MiB window, over the format's limit")
    emit("outer-window-128m", zstd_raw_frame(good.to_tar(), 27), "8",
         "the whole delta in a zstd frame declaring a 128 MiB window")
    emit("outer-window-16m", zstd_raw_frame(good.to_tar(), 24), "ok",
         "the whole delta in a zstd frame declaring a 16 MiB window, the largest allowed")
    padding = 256 << 20
    line = b"#" + b"x" * 1023 + b"\n"

    def padded():
        yield good.to_toml().encode()
        for _ in range(padding // len(line)):
            yield line
    text_size = len(good.to_toml().encode()) + padding // len(line) * len(line)

    wrong_sig = b""
    if secret_key:
        other = os.path.join(outdir, "other.txt")
        with open(other, "w") as f:
            f.write("some other manifest\n")
        subprocess.run(["minisign", "-S", "-s", secret_key, "-m", other, "-x", other + ".minisig"],
                       check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wrong_sig = open(other + ".minisig", "rb").read()

    def emit_manifest(name, size, pieces, codes, what, config="-"):
        sig = wrong_sig if config == "keys" else b""
        members = [("delta.toml", size, pieces), ("delta.toml.minisig", len(sig), [sig])]
        for c in good.contents:
            if c["source"] != "base":
                b = good.blobs["blobs/" + c["sha256"]]
                members.append(("blobs/" + c["sha256"], len(b), [b]))
        write_zstd_tar(os.path.join(outdir, name + ".delta"), members)
        index.append((name, codes, config, what))

    emit_manifest("manifest-256m-comments", text_size, padded(), "ok",
                  "a delta.toml of 256 MiB, nearly all comment lines (no keys: it applies)")
    emit_manifest("manifest-256m-keys", text_size, padded(), "10",
                  "the same 256 MiB delta.toml with keys configured, signed by a trusted key but for other text", "keys")
    one_line = good.to_toml().encode() + b"# " + b"y" * (2 << 20) + b"\n"
    emit_manifest("manifest-line-2m", len(one_line), [one_line], "8",
                  "a delta.toml line of 2 MiB, over the format's 1 MiB")
    many = 2_000_000
    fake = 'sha256 = "%s"' % ("ab" * 32)

    def entries(n, prefix):
        head = good.to_toml().split("changed = [\n")[0] + "changed = [\n"
        yield head.encode()
        batch = []
        for i in range(n):
            batch.append('{ path = "%s/%08d", type = "file", mode = 0o644, uid = 0, gid = 0, size = 1, %s },\n' % (prefix, i, fake))
            if len(batch) == 10000:
                yield "".join(batch).encode()
                batch = []
        yield ("".join(batch) + "]\ncontents = [\n]\n").encode()
    size_of = lambda n, prefix: sum(len(p) for p in entries(n, prefix))
    n_small = 100_000
    emit_manifest("changed-over-to-count", size_of(n_small, "zz"), entries(n_small, "zz"), "8",
                  "100 000 changed entries where to_count says the result has a handful")
    emit_manifest("changed-2m-wrong-signature", size_of(many, "zz"), entries(many, "zz"), "10",
                  "2 000 000 changed entries (300 MB) with keys configured, the signature for other text", "keys")

    with open(os.path.join(outdir, "index.tsv"), "w") as f:
        for row in index:
            f.write("\t".join(row) + "\n")
    print("%d hostile deltas in %s" % (len(index), outdir))


def zstd_frame_raw(data):
    """A zstd frame holding `data` in one raw (stored) block, with its content size."""
    assert len(data) < (128 << 10)
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out.append((2 << 6) | (1 << 5))  # frame header descriptor: 4-byte content size, single segment
    out += struct.pack("<I", len(data))
    out += struct.pack("<I", 1 | (0 << 1) | (len(data) << 3))[:3]
    out += data
    return bytes(out)


def zstd_raw_frame(data, window_log):
    """A zstd frame holding `data` in raw blocks of at most 128 KiB, declaring a window of
    2^window_log and no content size."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out.append(0x00)
    out.append((window_log - 10) << 3)
    block = 128 << 10
    pieces = [data[i:i + block] for i in range(0, len(data), block)] or [b""]
    for i, p in enumerate(pieces):
        last = 1 if i == len(pieces) - 1 else 0
        out += struct.pack("<I", last | (0 << 1) | (len(p) << 3))[:3] + p
    return bytes(out)


def zeros(n, chunk=1 << 20):
    """`n` zero bytes in pieces."""
    z = bytes(chunk)
    while n > 0:
        yield z[:min(n, chunk)]
        n -= min(n, chunk)


def sha256_of(pieces):
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    return h.hexdigest()


def write_zstd_tar(path, members):
    """Writes a zstd-compressed (level 1) ustar file of `members`, each (name, size, pieces),
    streaming: nothing is held whole, so members of hundreds of MiB cost no memory here."""
    with open(path, "wb") as f:
        z = subprocess.Popen(["zstd", "-q", "-1", "-c"], stdin=subprocess.PIPE, stdout=f)
        for name, size, pieces in members:
            z.stdin.write(member(name, size).tobuf(format=tarfile.USTAR_FORMAT))
            n = 0
            for p in pieces:
                z.stdin.write(p)
                n += len(p)
            assert n == size, (name, n, size)
            z.stdin.write(bytes(-size % 512))
        z.stdin.write(bytes(1024))
        z.stdin.close()
        assert z.wait() == 0


def fix_checksum(raw, off):
    """Recomputes the checksum of the tar header at `off` (so that the change reaches the
    reader's later checks)."""
    raw[off + 148 : off + 156] = b" " * 8
    s = sum(raw[off : off + 512])
    raw[off + 148 : off + 156] = b"%06o\0 " % s


def flip_hex(h):
    return ("1" if h[0] != "1" else "2") + h[1:]


if __name__ == "__main__":
    main()
