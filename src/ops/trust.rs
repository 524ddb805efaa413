//! Signed deltas: minisign (ed25519) signatures over the delta manifest, checked against the
//! public keys the config trusts, before anything is written. The manifest covers every byte
//! of the delta by hash, so the signature covers the whole delta.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use minisign::{PublicKey, SecretKey, SignatureBox};

use crate::core::error::Fail;

/// The largest key file read: minisign's are about 100 (public) and 350 (secret) bytes.
const MAX_KEY_FILE: u64 = 4096;

/// Reads a key file, which must be a small regular file: a FIFO or a device named by mistake
/// (or by an attacker who can edit the config) must neither block nor fill memory. It is
/// opened without blocking, checked with `fstat`, and read through a cap.
fn read_key_file(p: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)?;
    let m = f.metadata()?;
    if !m.is_file() {
        anyhow::bail!("not a regular file");
    }
    if m.len() > MAX_KEY_FILE {
        anyhow::bail!(
            "{} bytes, more than a key file holds ({MAX_KEY_FILE})",
            m.len()
        );
    }
    let mut text = String::new();
    f.take(MAX_KEY_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_KEY_FILE {
        anyhow::bail!("it grew past {MAX_KEY_FILE} bytes while it was read");
    }
    Ok(text)
}

/// Loads minisign public key files.
pub(crate) fn load_keys(paths: &[PathBuf]) -> Result<Vec<(PathBuf, PublicKey)>> {
    paths
        .iter()
        .map(|p| {
            let text = read_key_file(p)
                .with_context(|| format!("cannot read public key `{}`", p.display()))?;
            let key = PublicKey::from_box(text.into()).map_err(|e| {
                anyhow::anyhow!("`{}` is not a minisign public key: {e}", p.display())
            })?;
            Ok((p.clone(), key))
        })
        .collect()
}

/// Signs `data` with an unencrypted minisign secret key file (`minisign -G -W`); returns the
/// signature file text.
pub(crate) fn sign(data: &[u8], secret_key: &Path, comment: &str) -> Result<String> {
    let sk = load_secret_key(secret_key)?;
    let sig = minisign::sign(None, &sk, Cursor::new(data), Some(comment), None)
        .map_err(|e| anyhow::anyhow!("cannot sign: {e}"))?;
    Ok(sig.into_string())
}

/// Parses an unencrypted minisign secret key file. minisign 0.11 writes such keys with a zero
/// checksum, which the `minisign` crate rejects, so the checksum (BLAKE2b-256 of the
/// algorithm, key id and secret key) is filled in here.
fn parse_secret_key(text: &str) -> Result<SecretKey> {
    use base64::Engine;
    use blake2::Digest;
    let line = text
        .lines()
        .find(|l| !l.starts_with("untrusted comment:") && !l.trim().is_empty())
        .context("no key line")?;
    let mut b = base64::engine::general_purpose::STANDARD
        .decode(line.trim())
        .context("the key is not base64")?;
    if b.len() != 158 || &b[..2] != b"Ed" {
        anyhow::bail!("unexpected key length or algorithm");
    }
    if b[2..4] != [0, 0] {
        anyhow::bail!("the key is encrypted with a password");
    }
    let chk = blake2::Blake2b::<blake2::digest::consts::U32>::new()
        .chain_update(&b[..2])
        .chain_update(&b[54..62])
        .chain_update(&b[62..126])
        .finalize();
    b[126..158].copy_from_slice(&chk);
    SecretKey::from_bytes(&b).map_err(|e| anyhow::anyhow!("{e}"))
}

/// How strictly to check.
#[derive(Clone, Copy)]
pub(crate) enum Policy<'a> {
    /// `--insecure`: no check at all.
    Insecure,
    /// The trusted keys; with none, unsigned deltas pass with a warning.
    Keys(&'a [(PathBuf, PublicKey)]),
}

/// A signature of minisign's legacy form (not prehashed) is checked on the whole manifest in
/// memory: accepted only on manifests up to this size. minisign signs prehashed by default.
const MAX_LEGACY_SIGNED: u64 = 16 << 20;

/// Checks the signature `sig` (the text of the `delta.toml.minisig` member, empty when the delta
/// is unsigned) over the `len` manifest bytes `data` holds from its start. The bytes are
/// hashed as they are read (a prehashed signature), so memory does not depend on their size.
pub(crate) fn check(
    data: &mut (impl std::io::Read + std::io::Seek),
    len: u64,
    sig: &str,
    policy: Policy,
) -> Result<()> {
    let keys = match policy {
        Policy::Insecure => {
            log::warn!("--insecure: NOT checking the delta's signature (development only)");
            return Ok(());
        }
        Policy::Keys(k) => k,
    };
    if keys.is_empty() {
        if sig.trim().is_empty() {
            log::warn!(
                "accepting an unsigned delta: no public keys are configured ([trust] public_keys)"
            );
        } else {
            log::warn!("the delta is signed, but no public keys are configured to check it");
        }
        return Ok(());
    }
    verify(data, len, sig, keys).map(|path| {
        log::info!("delta signature verified with `{}`", path.display());
    })
}

/// Checks the signature `sig` over the `len` bytes `data` holds from its start against the
/// trusted `keys` (at least one); returns the key file that verifies it, else fails
/// ([`Fail::Untrusted`]) saying why.
pub(crate) fn verify(
    data: &mut (impl std::io::Read + std::io::Seek),
    len: u64,
    sig: &str,
    keys: &[(PathBuf, PublicKey)],
) -> Result<PathBuf> {
    if sig.trim().is_empty() {
        return Err(Fail::Untrusted(
            "the delta is not signed, and signed deltas are required".into(),
        )
        .into());
    }
    let sbox = SignatureBox::from_string(sig)
        .map_err(|e| Fail::Untrusted(format!("the delta's signature is malformed: {e}")))?;
    if !sbox.is_prehashed() && len > MAX_LEGACY_SIGNED {
        return Err(Fail::Untrusted(format!(
            "the delta's signature is of minisign's legacy form, accepted only on manifests of at most {MAX_LEGACY_SIGNED} bytes (this one has {len}); sign it prehashed"
        ))
        .into());
    }
    for (path, key) in keys {
        data.seek(std::io::SeekFrom::Start(0))
            .context("cannot read the delta's manifest")?;
        let mut bytes = std::io::Read::take(&mut *data, len);
        let checked = if sbox.is_prehashed() {
            minisign::verify(key, &sbox, NoSeek(&mut bytes), true, false, false)
        } else {
            let mut whole = Vec::new();
            std::io::Read::read_to_end(&mut bytes, &mut whole)
                .context("cannot read the delta's manifest")?;
            minisign::verify(key, &sbox, Cursor::new(whole), true, false, true)
        };
        if checked.is_ok() {
            return Ok(path.clone());
        }
    }
    Err(Fail::Untrusted(format!(
        "the delta's signature does not verify with any of the {} trusted public key(s)",
        keys.len()
    ))
    .into())
}

/// A reader that `minisign::verify` may take (it asks for `Seek` but reads a prehashed
/// signature's data once, from where it is).
struct NoSeek<R>(R);

impl<R: std::io::Read> std::io::Read for NoSeek<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R> std::io::Seek for NoSeek<R> {
    fn seek(&mut self, _: std::io::SeekFrom) -> std::io::Result<u64> {
        Err(std::io::Error::other("not seekable"))
    }
}

/// The public key of an unencrypted minisign secret key file: what `publish` checks the
/// index it re-signs against (it signs only what it signed before).
pub(crate) fn public_key_of(secret_key: &Path) -> Result<PublicKey> {
    let sk = load_secret_key(secret_key)?;
    PublicKey::from_secret_key(&sk)
        .map_err(|e| anyhow::anyhow!("cannot derive the public key: {e}"))
}

/// Reads an unencrypted minisign secret key file.
fn load_secret_key(secret_key: &Path) -> Result<SecretKey> {
    let text = read_key_file(secret_key)
        .with_context(|| format!("cannot read secret key `{}`", secret_key.display()))?;
    parse_secret_key(&text).with_context(|| {
        format!(
            "`{}` is not an unencrypted minisign secret key (make one with `minisign -G -W`)",
            secret_key.display()
        )
    })
}
