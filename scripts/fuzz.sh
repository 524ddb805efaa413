#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (default 60) and prints, per target,
# the executions run and the crashes found. Exits 1 if any target crashed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Works on stable Rust: cargo-fuzz needs nightly flags (-Zsanitizer=address), which
# RUSTC_BOOTSTRAP=1 unlocks. Installs cargo-fuzz if it is missing; needs python3 (for the seeds).
# Seeds come from real files (the fixture trees' manifests, a delta between them, its blobs);
# the growing corpus lives in fuzz/corpus/<target>/ and crash inputs in
# fuzz/artifacts/<target>/ (both ignored by git). A crash is kept and fuzzing goes on with the
# time that is left, so one run can find several.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(manifest_parse delta_read patch_apply)
export RUSTC_BOOTSTRAP=1
cd "$repo"

export PATH="$PATH:$HOME/.cargo/bin"
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
  cargo install -q cargo-fuzz --locked
fi
cargo build -q
bin=${CARGO_TARGET_DIR:-$repo/target}/debug/treeswap

# --- seeds --------------------------------------------------------------------------------
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds"/{manifest_parse,delta_read,patch_apply}
"$bin" manifest fixtures/v1 >"$seeds/manifest_parse/v1.toml"
"$bin" manifest fixtures/v2 >"$seeds/manifest_parse/v2.toml"
# A plain tar (python's tarfile below cannot read zstd), and the compressed form `diff` writes
# by default.
"$bin" diff --from-dir fixtures/v1 --to-dir fixtures/v2 --from-version 1 --to-version 2 \
  --uncompressed -o "$seeds/delta_read/v1-v2.delta"
"$bin" diff --from-dir fixtures/v1 --to-dir fixtures/v2 --from-version 1 --to-version 2 \
  -o "$seeds/delta_read/v1-v2-zstd.delta"
tar -xOf "$seeds/delta_read/v1-v2.delta" delta.toml >"$seeds/delta_read/delta.toml"
head -c 2048 "$seeds/delta_read/v1-v2.delta" >"$seeds/delta_read/head-only.delta"
# patch_apply inputs: source byte (bit 7: a sha256 follows), size (3 bytes LE), reference
# length (2 bytes LE), [sha256,] reference, blob; see fuzz/fuzz_targets/patch_apply.rs. Seeds
# of real blobs carry their content's sha256, so that fuzzing starts from objects that are
# published, and a copy without it.
python3 - "$seeds" "$seeds/delta_read/v1-v2.delta" fixtures/v1 <<'EOF'
import hashlib, io, lzma, os, struct, subprocess, sys, tarfile, tomllib
seeds, delta, v1 = sys.argv[1:4]
by_sha = {}
for dirpath, _, files in os.walk(v1):
    for f in files:
        p = os.path.join(dirpath, f)
        if os.path.isfile(p) and not os.path.islink(p):
            b = open(p, "rb").read()
            by_sha[hashlib.sha256(b).hexdigest()] = b
def seed(name, source, size, ref, blob, sha):
    head = struct.pack("<I", size)[:3] + struct.pack("<H", len(ref))
    for suffix, data in (("", bytes([source]) + head + ref + blob),
                         ("-sha", bytes([source | 0x80]) + head + sha + ref + blob)):
        open(os.path.join(seeds, "patch_apply", name + suffix), "wb").write(data)
with tarfile.open(delta) as t:
    m = tomllib.loads(t.extractfile("delta.toml").read().decode())
    for i, c in enumerate(m["contents"]):
        if c["source"] == "base":
            continue
        blob = t.extractfile("blobs/" + c["sha256"]).read()
        ref = by_sha.get(c.get("base", ""), b"")
        seed("%s-%d" % (c["source"], i), {"zstd": 1, "zstd-patch": 2, "bsdiff": 3, "xz": 0xf0}[c["source"]], c["size"], ref, blob,
             bytes.fromhex(c["sha256"]))
# bsdiff: one control triple (add the whole reference, copy 5 extra bytes), then the
# difference bytes and the extra bytes, zstd-compressed.
ref = b"hello, world\n" * 20
new = bytes((b + (1 if i % 7 == 0 else 0)) % 256 for i, b in enumerate(ref)) + b"extra"
body = struct.pack("<QQQ", len(ref), 5, 0) + bytes((n - o) % 256 for n, o in zip(new, ref)) + b"extra"
z = subprocess.run(["zstd", "-q", "-c"], input=body, capture_output=True, check=True).stdout
seed("bsdiff", 3, len(new), ref, z, hashlib.sha256(new).digest())
z = subprocess.run(["zstd", "-q", "-c"], input=new, capture_output=True, check=True).stdout
seed("zstd-cli", 1, len(new), b"", z, hashlib.sha256(new).digest())
# xz (byte 0 from 0xf0): one .xz stream, its dictionary the 4 KiB a small content allows.
z = lzma.compress(new, format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 4096}])
seed("xz", 0xf0, len(new), b"", z, hashlib.sha256(new).digest())
EOF

# --- run ----------------------------------------------------------------------------------
cargo fuzz build -O >/dev/null 2>&1 || cargo fuzz build -O
# Where patch_apply keeps its pool (one directory per process), removed with the seeds.
export TREESWAP_FUZZ_DIR=$seeds
failed=0
printf '%-16s %12s %8s  %s\n' target executions crashes artifacts
for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  artifacts=fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  before=$(ls "$artifacts" | grep -cvE '^report-' || true)
  execs=0
  start=$(date +%s)
  log=$(mktemp)
  while :; do
    left=$((secs - ($(date +%s) - start)))
    [ "$left" -gt 0 ] || break
    # -malloc_limit_mb: any single allocation above 512 MiB counts as a crash (a decoder must
    # never allocate for bytes that do not exist); -rss_limit_mb: the whole process.
    set +e
    cargo fuzz run -O "$t" "$corpus" "$seeds/$t" -- \
      -max_total_time="$left" -malloc_limit_mb=512 -rss_limit_mb=2048 -timeout=10 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1
    rc=$?
    set -e
    n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)
    execs=$((execs + ${n:-0}))
    if [ "$rc" -eq 0 ]; then
      break
    fi
    # A crash: keep its report next to the artifact and go on with the time left.
    cp "$log" "$artifacts/report-$(date +%s%N).txt"
    grep -m1 -E "^==[0-9]+==ERROR|panicked at|out-of-memory|malloc\(|Timeout" "$log" >&2 || true
    # libFuzzer's own stats are lost on a crash; count what the last status line said.
    n=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    execs=$((execs + ${n:-0}))
  done
  rm -f "$log"
  crashes=$(($(ls "$artifacts" | grep -cvE '^report-' || true) - before))
  [ "$crashes" -ge 0 ] || crashes=0
  printf '%-16s %12d %8d  %s\n' "$t" "$execs" "$crashes" "$artifacts"
  [ "$crashes" -eq 0 ] || failed=1
done
exit "$failed"
