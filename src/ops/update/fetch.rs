//! Getting bytes of a release repository: content sources (`Source`: `http://` and
//! `https://` through ureq with rustls, `file://` from the file system; peers may be added
//! later behind the same trait) and the resumable, chunk-checked download of a delta file.
//!
//! A download lives in the root's `downloads/<sha256>.part` until it is complete; it survives
//! a dropped connection, a kill and a reboot (the writer's lock clears `tmp/`, not
//! `downloads/`). On resume, its complete chunks are checked against the index's chunk
//! hashes (a bad one and what follows it is cut off) and the rest is fetched with a range
//! request from where the file ends: nothing it has is fetched again. No more than the
//! signed size is ever read; each chunk is checked as it completes; a source that fails
//! [`Net::retries`] times without progress, or serves a chunk that does not match, is dropped
//! for the run and the next one continues from the good bytes.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::core::config;
use crate::core::error::Fail;
use crate::core::object::Hash;
use crate::core::progress::Progress;

/// How the network is used: one agent (connection pool, TLS roots) for the run.
pub(crate) struct Net {
    agent: ureq::Agent,
    /// A transfer with no byte (or less than [`MIN_BYTES_PER_WINDOW`]) for this long is
    /// stalled.
    pub stall: Duration,
    /// Attempts of one source without progress before it is dropped.
    pub retries: u32,
}

/// The least a transfer must bring in each stall window (a trickle is a stall).
const MIN_BYTES_PER_WINDOW: u64 = 1024;
/// The most attempts at one source for one file, even when each made progress (a cut
/// connection is resumed at once): past them, the source is dropped for the run.
const MAX_ATTEMPTS: u32 = 32;
/// The longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(8);

impl Net {
    pub(crate) fn new(cfg: &config::Update) -> Result<Net> {
        let stall = Duration::from_secs(cfg.stall_timeout);
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &cfg.ca {
            let pem =
                read_ca(ca).with_context(|| format!("cannot read CA file `{}`", ca.display()))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow!("CA file `{}`: {e}", ca.display()))?;
            if certs.is_empty() {
                bail!("CA file `{}` holds no certificate", ca.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let config = ureq::Agent::config_builder()
            .tls_config(tls.build())
            // Only the hosts the config names: no proxy from the environment.
            .proxy(None)
            .http_status_as_error(false)
            .max_redirects(5)
            .timeout_connect(Some(stall))
            .timeout_recv_response(Some(stall))
            .timeout_per_read(Some(stall))
            .user_agent(concat!("treeswap/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Net {
            agent: ureq::Agent::new_with_config(config),
            stall,
            retries: cfg.retries,
        })
    }
}

/// The largest CA file read.
const MAX_CA_FILE: u64 = 1 << 20;

fn read_ca(p: &Path) -> Result<Vec<u8>> {
    let f = fs_err::File::open(p)?;
    if !f.metadata()?.is_file() {
        bail!("not a regular file");
    }
    let mut v = Vec::new();
    f.take(MAX_CA_FILE + 1).read_to_end(&mut v)?;
    if v.len() as u64 > MAX_CA_FILE {
        bail!("larger than {MAX_CA_FILE} bytes");
    }
    Ok(v)
}

/// A source that does not have the file at all (HTTP 404 or 410, no such file): trying it
/// again would not help, so it is dropped at once.
#[derive(Debug)]
struct NotThere(String);

impl std::fmt::Display for NotThere {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotThere {}

/// A small file fetched whole (the index, its signature).
pub(crate) enum Small {
    Body {
        bytes: Vec<u8>,
        etag: Option<String>,
    },
    /// The conditional request's answer: what the cache holds is current.
    NotModified,
    NotFound,
}

/// An opened file of the repository, from byte `start`.
pub(crate) struct Opened<'a> {
    /// Where the bytes begin: the offset asked for, or 0 from a source that cannot resume.
    pub start: u64,
    pub reader: Box<dyn Read + 'a>,
}

/// Where the bytes of a repository's files come from. The index comes only from the `url`'s
/// own source; delta files from any (mirrors first).
pub(crate) trait Source {
    /// For messages: the URL of the repository's top.
    fn name(&self) -> &str;
    /// Fetches a small file whole, reading at most `cap + 1` bytes (more is an error);
    /// `etag` makes the request conditional.
    fn get_small(&self, rel: &str, cap: u64, etag: Option<&str>) -> Result<Small>;
    /// Opens `rel` from byte `offset`.
    fn open(&self, rel: &str, offset: u64) -> Result<Opened<'_>>;
}

/// The source for a repository URL: `http://`, `https://` or `file://`.
pub(crate) fn source_for<'a>(url: &str, net: &'a Net) -> Result<Box<dyn Source + 'a>> {
    let top = url.trim_end_matches('/').to_owned();
    if let Some(path) = top.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!(
                "`{}`: a file:// URL needs an absolute path",
                crate::core::path::quote(url)
            );
        }
        return Ok(Box::new(FileSource {
            name: top.clone(),
            dir: PathBuf::from(path),
        }));
    }
    if top.starts_with("http://") || top.starts_with("https://") {
        return Ok(Box::new(HttpSource { top, net }));
    }
    bail!(
        "`{}` is not an http://, https:// or file:// URL",
        crate::core::path::quote(url)
    )
}

struct HttpSource<'a> {
    top: String,
    net: &'a Net,
}

impl HttpSource<'_> {
    fn url(&self, rel: &str) -> String {
        format!("{}/{rel}", self.top)
    }

    /// A GET of `url`: from an https repository, every redirect must stay on https (ureq
    /// would follow one to plain http); `global`, a limit on the whole request.
    fn get(
        &self,
        url: &str,
        global: Option<Duration>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.net
            .agent
            .get(url)
            .config()
            .https_only(self.top.starts_with("https://"))
            .timeout_global(global)
            .build()
    }
}

/// How long a small file (the index, its signature) may take in all, in stall timeouts: a
/// server that trickles it in just faster than the stall timeout is cut off at this.
const SMALL_FILE_STALLS: u32 = 10;

/// A ureq error in one line, without the URL's host details beyond what it says.
fn http_error(url: &str, e: ureq::Error) -> anyhow::Error {
    // ureq's message may quote what the server sent (a `Location` header): escaped too.
    anyhow!(
        "cannot get `{}`: {}",
        crate::core::path::quote_at_most(url, 200),
        crate::core::path::quote_at_most(e.to_string(), 200)
    )
}

impl Source for HttpSource<'_> {
    fn name(&self) -> &str {
        &self.top
    }

    fn get_small(&self, rel: &str, cap: u64, etag: Option<&str>) -> Result<Small> {
        let url = self.url(rel);
        let mut req = self.get(&url, Some(self.net.stall * SMALL_FILE_STALLS));
        if let Some(t) = etag {
            req = req.header("If-None-Match", t);
        }
        let resp = req.call().map_err(|e| http_error(&url, e))?;
        match resp.status().as_u16() {
            200 => {}
            304 if etag.is_some() => return Ok(Small::NotModified),
            404 | 410 => return Ok(Small::NotFound),
            s => bail!("cannot get `{url}`: HTTP status {s}"),
        }
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 200)
            .map(str::to_owned);
        let mut bytes = Vec::new();
        resp.into_body()
            .into_with_config()
            .reader()
            .take(cap + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                anyhow!(
                    "cannot get `{url}`: {}",
                    crate::core::path::quote_at_most(e.to_string(), 200)
                )
            })?;
        if bytes.len() as u64 > cap {
            bail!("`{url}` is larger than {cap} bytes");
        }
        Ok(Small::Body { bytes, etag })
    }

    fn open(&self, rel: &str, offset: u64) -> Result<Opened<'_>> {
        let url = self.url(rel);
        let mut req = self.get(&url, None);
        if offset > 0 {
            req = req.header("Range", format!("bytes={offset}-"));
        }
        let resp = req.call().map_err(|e| http_error(&url, e))?;
        let start = match resp.status().as_u16() {
            200 => 0,
            206 => {
                let range = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                // `bytes START-END/LEN`: the part must start where it was asked to.
                let got = range
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if got != Some(offset) {
                    bail!(
                        "`{url}` answered the range from {offset} with `{}`",
                        crate::core::path::quote_at_most(range, 80)
                    );
                }
                offset
            }
            s @ (404 | 410) => {
                return Err(NotThere(format!("cannot get `{url}`: HTTP status {s}")).into());
            }
            s => bail!("cannot get `{url}`: HTTP status {s}"),
        };
        Ok(Opened {
            start,
            reader: Box::new(resp.into_body().into_with_config().reader()),
        })
    }
}

struct FileSource {
    name: String,
    dir: PathBuf,
}

impl FileSource {
    /// Opens a regular file of the repository (never blocking on a FIFO).
    fn open_file(&self, rel: &str) -> Result<Option<std::fs::File>> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.dir.join(rel);
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&p)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open `{}`", p.display())),
        };
        if !f.metadata()?.is_file() {
            bail!("`{}` is not a regular file", p.display());
        }
        Ok(Some(f))
    }
}

impl Source for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn get_small(&self, rel: &str, cap: u64, _etag: Option<&str>) -> Result<Small> {
        let Some(f) = self.open_file(rel)? else {
            return Ok(Small::NotFound);
        };
        let mut bytes = Vec::new();
        f.take(cap + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > cap {
            bail!("`{}/{rel}` is larger than {cap} bytes", self.name);
        }
        Ok(Small::Body { bytes, etag: None })
    }

    fn open(&self, rel: &str, offset: u64) -> Result<Opened<'_>> {
        let mut f = self
            .open_file(rel)?
            .ok_or_else(|| NotThere(format!("`{}/{rel}` does not exist", self.name)))?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset))?;
        Ok(Opened {
            start: offset,
            reader: Box::new(f),
        })
    }
}

/// A delta file to download, as the index describes it.
pub(crate) struct Want<'a> {
    pub rel: &'a str,
    pub size: u64,
    pub sha256: Hash,
    pub chunk_size: u64,
    pub chunks: Vec<Hash>,
}

/// What the downloads of a run fetched.
#[derive(Default, Debug)]
pub(crate) struct Fetched {
    /// Bytes read from sources (including any a source without ranges sent again).
    pub bytes: u64,
    /// Bytes that were already in `downloads/` from an earlier run.
    pub resumed: u64,
    /// The sources dropped in this run (by name): not tried again for a later delta.
    pub dropped: Vec<String>,
}

/// How an attempt at one source ended.
enum Attempt {
    Done,
    /// A failure; whether it brought good bytes first.
    Failed {
        error: anyhow::Error,
        progress: bool,
    },
    /// The source served bytes that do not match: it is dropped.
    Mismatch(anyhow::Error),
    /// The source does not have the file: it is dropped.
    Gone(anyhow::Error),
}

/// The name of the download of the file whose sha256 is `sha` in `downloads/`.
pub(crate) fn part_name(sha: &Hash) -> String {
    format!("{}.part", hex::encode(sha))
}

/// Downloads `want` into `dir` (the root's `downloads/`), from `sources` in order; returns
/// the complete file's path. See the module's doc for resume, caps and checks.
pub(crate) fn download(
    dir: &Path,
    want: &Want,
    sources: &[Box<dyn Source + '_>],
    net: &Net,
    fetched: &mut Fetched,
) -> Result<PathBuf> {
    let path = dir.join(part_name(&want.sha256));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open `{}`", path.display()))?;
    let mut have = file.metadata()?.len();
    if have > want.size {
        log::warn!(
            "`{}` is longer than the delta: starting again",
            path.display()
        );
        have = 0;
    }
    // The complete chunks from before are checked (a power cut may have left garbage); the
    // first bad one and everything after it goes.
    let cs = want.chunk_size;
    let mut good = 0;
    // Local bytes are hashed through a buffer of at most 1 MiB, whatever the chunk size.
    let mut buf = vec![0u8; cs.min(1 << 20) as usize];
    let hash_range = |h: &mut Sha256, buf: &mut [u8], mut at: u64, end: u64| -> Result<()> {
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    };
    while good + cs <= have || (good < have && have == want.size) {
        let end = (good + cs).min(want.size);
        let mut h = Sha256::new();
        hash_range(&mut h, &mut buf, good, end)?;
        if h.finalize().as_slice() != want.chunks[(good / cs) as usize] {
            log::warn!(
                "`{}`: chunk {} does not match; fetching it again",
                path.display(),
                good / cs
            );
            have = good;
            break;
        }
        good = end;
    }
    file.set_len(have)?;
    // The tail of an unfinished chunk is kept; it is checked when the chunk completes.
    let mut chunk = Sha256::new();
    hash_range(&mut chunk, &mut buf, good, have)?;
    drop(buf);
    fetched.resumed += have;
    if have > 0 {
        log::info!("resuming `{}` at {have} of {} bytes", want.rel, want.size);
    }
    let bar = Progress::bytes(want.size, "download");
    bar.inc(have);
    let mut pos = have;
    // Why each source was dropped: warned about once the file is complete, or folded into
    // the one error line when no source could finish it.
    let mut dropped: Vec<String> = Vec::new();
    let mut mismatched = false;
    for src in sources {
        if pos == want.size {
            break;
        }
        if fetched.dropped.iter().any(|d| d == src.name()) {
            continue;
        }
        let mut failures = 0u32;
        // Attempts that each brought a little and then failed: capped too, or a server that
        // sends a byte per connection would hold the writer's lock for ever.
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match attempt(
                &file,
                want,
                src.as_ref(),
                net,
                &mut pos,
                &mut chunk,
                &bar,
                fetched,
            ) {
                Attempt::Done => break,
                Attempt::Mismatch(e) => {
                    log::info!("dropping `{}` for this run: {e:#}", src.name());
                    mismatched = true;
                    dropped.push(format!("{e:#}"));
                    fetched.dropped.push(src.name().to_owned());
                    break;
                }
                Attempt::Gone(e) => {
                    log::info!("dropping `{}` for this run: {e:#}", src.name());
                    dropped.push(format!("{e:#}"));
                    break;
                }
                Attempt::Failed { error, progress } => {
                    failures = if progress { 0 } else { failures + 1 };
                    let error = match attempts > MAX_ATTEMPTS {
                        true => error.context(format!(
                            "{attempts} attempts at `{}` for `{}` failed",
                            src.name(),
                            want.rel
                        )),
                        false => error,
                    };
                    if failures > net.retries || attempts > MAX_ATTEMPTS {
                        log::info!("dropping `{}` for this run: {error:#}", src.name());
                        dropped.push(format!("{error:#}"));
                        fetched.dropped.push(src.name().to_owned());
                        break;
                    }
                    // A cut after progress is resumed at once; failures in a row back off.
                    let pause = match failures {
                        0 => Duration::ZERO,
                        n => Duration::from_millis(250 << n.min(5)).min(MAX_BACKOFF),
                    };
                    log::info!("{error:#}; trying again in {} ms", pause.as_millis());
                    std::thread::sleep(pause);
                }
            }
        }
    }
    bar.finish();
    if pos < want.size {
        // Nothing kept is nothing left behind.
        if pos == 0 {
            let _ = std::fs::remove_file(&path);
        }
        let msg = format!(
            "cannot download `{}` ({pos} of {} bytes kept for the next run): {}",
            want.rel,
            want.size,
            match dropped.is_empty() {
                true => "no source to get it from".to_string(),
                false => dropped.join("; "),
            }
        );
        return Err(match mismatched {
            true => Fail::Mismatch(msg).into(),
            false => anyhow!(msg),
        });
    }
    for d in &dropped {
        log::warn!("a source was dropped for this run: {d}");
    }
    // Every chunk matched; the whole file is checked too, as the index says it.
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < want.size {
        let n = (want.size - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        whole.update(&buf[..n]);
        at += n as u64;
    }
    if whole.finalize().as_slice() != want.sha256 {
        drop(file);
        fs_err::remove_file(&path)?;
        return Err(Fail::Mismatch(format!(
            "`{}` does not match the sha256 the index gives",
            want.rel
        ))
        .into());
    }
    Ok(path)
}

/// One attempt at `src`: fetch from `pos` on, writing and checking chunk by chunk.
#[allow(clippy::too_many_arguments)]
fn attempt(
    file: &std::fs::File,
    want: &Want,
    src: &dyn Source,
    net: &Net,
    pos: &mut u64,
    chunk: &mut Sha256,
    bar: &Progress,
    fetched: &mut Fetched,
) -> Attempt {
    let failed = |error: anyhow::Error, progress: bool| Attempt::Failed { error, progress };
    let opened = match src.open(want.rel, *pos) {
        Ok(o) => o,
        Err(e) if e.downcast_ref::<NotThere>().is_some() => return Attempt::Gone(e),
        Err(e) => return failed(e, false),
    };
    let mut reader = opened.reader;
    if opened.start != *pos {
        // A source that cannot resume: what it sends again is read and dropped.
        log::warn!(
            "`{}` does not resume downloads: reading {} bytes again",
            src.name(),
            *pos
        );
        let mut skip = (&mut reader).take(*pos);
        match std::io::copy(&mut skip, &mut std::io::sink()) {
            Ok(n) if n == *pos => fetched.bytes += n,
            Ok(n) => return failed(anyhow!("`{}` ended after {n} bytes", src.name()), false),
            Err(e) => return failed(anyhow!("`{}`: {e}", src.name()), false),
        }
    }
    // Never more than the signed size.
    let mut reader = reader.take(want.size - *pos);
    let cs = want.chunk_size;
    let mut buf = vec![0u8; 256 << 10];
    let start_pos = *pos;
    let mut window = (Instant::now(), 0u64);
    while *pos < want.size {
        // Read at most up to the end of the current chunk.
        let room = (cs - *pos % cs).min(want.size - *pos).min(buf.len() as u64) as usize;
        let n = match reader.read(&mut buf[..room]) {
            Ok(0) => {
                return failed(
                    anyhow!(
                        "`{}` ended the transfer at {} of {} bytes",
                        src.name(),
                        *pos,
                        want.size
                    ),
                    *pos > start_pos,
                );
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return failed(
                    anyhow!(
                        "`{}`: {} (at {} of {} bytes)",
                        src.name(),
                        e,
                        *pos,
                        want.size
                    ),
                    *pos > start_pos,
                );
            }
        };
        fetched.bytes += n as u64;
        if let Err(e) = file.write_all_at(&buf[..n], *pos) {
            return failed(anyhow!(e).context("cannot write the download"), false);
        }
        chunk.update(&buf[..n]);
        *pos += n as u64;
        bar.inc(n as u64);
        if (*pos).is_multiple_of(cs) || *pos == want.size {
            let i = ((*pos - 1) / cs) as usize;
            let got = std::mem::take(chunk).finalize();
            if got.as_slice() != want.chunks[i] {
                let back = i as u64 * cs;
                if let Err(e) = file.set_len(back) {
                    return failed(anyhow!(e).context("cannot truncate the download"), false);
                }
                *pos = back;
                let e = anyhow!(
                    "`{}/{}`: chunk {i} does not match the index",
                    src.name(),
                    want.rel
                );
                // A chunk begun before this attempt (kept from an earlier run, which a power
                // cut may have damaged) is no proof against this source: once more, from the
                // chunk's start, all from it.
                if back < start_pos {
                    return failed(e.context("fetching the chunk again"), true);
                }
                return Attempt::Mismatch(e);
            }
        }
        // A trickle is a stall.
        window.1 += n as u64;
        if window.0.elapsed() >= net.stall {
            if window.1 < MIN_BYTES_PER_WINDOW {
                return failed(
                    anyhow!(
                        "`{}` is too slow ({} bytes in {} s)",
                        src.name(),
                        window.1,
                        net.stall.as_secs()
                    ),
                    // A trickle is no progress: `retries` of them drop the source.
                    false,
                );
            }
            window = (Instant::now(), 0);
        }
    }
    Attempt::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 13: what ureq says may quote the server (a `Location` header): escaped, never
    /// control characters on the terminal.
    #[test]
    fn a_network_error_is_quoted() {
        let e = http_error(
            "http://127.0.0.1:1/stable/index.toml",
            ureq::Error::BadUri("\x1b[2J\x1b]0;owned\x07\nfake line".into()),
        );
        let msg = format!("{e:#}");
        assert!(!msg.chars().any(|c| c.is_control()), "{msg:?}");
        assert!(msg.contains("bad uri"), "{msg:?}");
    }
}
