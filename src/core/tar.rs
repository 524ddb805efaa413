//! The tar subset a delta is written in (FORMAT.md, "Delta"), read with a cap on everything.
//!
//! Every header is one 512-byte ustar block, read into a fixed buffer: its checksum, magic,
//! name, type flag and size are checked before a byte of the member's data is read. Only
//! regular files whose whole name is in the 100-byte name field exist in the subset: GNU
//! long names and long link names (`L`, `K`), PAX extended headers (`x`, `g`), links,
//! directories, devices and FIFOs are refused from their header, so no extension is ever
//! buffered. How many bytes of a member the caller accepts is the caller's cap
//! ([`Member::size`] is checked against it before the data is read). The archive ends with a
//! zero block (a second one may follow; anything but zeros in it is refused), or at the end
//! of the stream on a member boundary.
//!
//! Pure over a [`Read`]: no file-system call.

use std::io::{self, Read};

use anyhow::{Result, bail};

use crate::core::path::quote;

/// The tar block size: headers are one block, data is padded to whole blocks.
pub(crate) const BLOCK: usize = 512;

/// One member's header, as far as the subset has one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Member {
    /// The name (the name field up to its NUL: at most 100 bytes).
    pub(crate) name: Vec<u8>,
    /// The data size the header declares: a claim, checked by the caller against its cap.
    pub(crate) size: u64,
}

/// Reads the members of a tar stream in order: [`Reader::next`] gives a header, then the
/// reader's [`Read`] gives that member's data and nothing more.
pub(crate) struct Reader<R> {
    inner: R,
    /// Members whose header was read (for messages: "member 3").
    count: u64,
    /// Data bytes of the current member not yet read.
    left: u64,
    /// Padding bytes after the current member's data.
    pad: u64,
    /// The end of the archive was reached.
    ended: bool,
}

impl<R: Read> Reader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Reader {
            inner,
            count: 0,
            left: 0,
            pad: 0,
            ended: false,
        }
    }

    /// The next member's header, or `None` at the end of the archive. What is left of the
    /// previous member (data the caller did not read, its padding) is skipped first.
    pub(crate) fn next(&mut self) -> Result<Option<Member>> {
        if self.ended {
            return Ok(None);
        }
        let skip = self.left + self.pad;
        if skip > 0 {
            let got = io::copy(&mut (&mut self.inner).take(skip), &mut io::sink())
                .map_err(|e| anyhow::anyhow!("cannot read member {}: {e}", self.count))?;
            if got != skip {
                bail!("it is truncated: member {} is cut short", self.count);
            }
            self.left = 0;
            self.pad = 0;
        }
        let mut block = [0u8; BLOCK];
        let n = read_full(&mut self.inner, &mut block)
            .map_err(|e| anyhow::anyhow!("cannot read it: {e}"))?;
        let index = self.count + 1;
        if n == 0 {
            // The end of the stream on a member boundary: every member is complete.
            self.ended = true;
            return Ok(None);
        }
        if n < BLOCK {
            bail!("it is truncated: the header of member {index} is cut short");
        }
        let Some(member) = parse_header(&block, index)? else {
            self.ended = true;
            self.second_end_block()?;
            return Ok(None);
        };
        self.count = index;
        self.left = member.size;
        self.pad = padding(member.size);
        Ok(Some(member))
    }

    /// After the first zero block: a second one, or the end of the stream. What follows it
    /// is not read.
    fn second_end_block(&mut self) -> Result<()> {
        let mut block = [0u8; BLOCK];
        let n = read_full(&mut self.inner, &mut block)
            .map_err(|e| anyhow::anyhow!("cannot read it: {e}"))?;
        if block[..n].iter().any(|&b| b != 0) {
            bail!("it has data after the end-of-archive block");
        }
        Ok(())
    }
}

/// The current member's data: at most the size its header declares, an error if the stream
/// ends before that.
impl<R: Read> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ends inside it",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The zero bytes that pad `size` bytes of data to a whole block.
fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Reads until `buf` is full or the stream ends; the number of bytes read.
pub(crate) fn read_full(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a type flag the subset refuses stands for, for the message.
fn kind_name(flag: u8) -> &'static str {
    match flag {
        b'1' => "a hard link",
        b'2' => "a symbolic link",
        b'3' => "a character device",
        b'4' => "a block device",
        b'5' => "a directory",
        b'6' => "a FIFO",
        b'7' => "a contiguous file",
        b'L' => "a GNU long-name extension",
        b'K' => "a GNU long-link-name extension",
        b'x' => "a PAX extended header",
        b'g' => "a PAX global header",
        _ => "of an unknown type",
    }
}

/// Parses one header block (member `index`, from 1, for messages): `None` for a zero block
/// (the end of the archive).
pub(crate) fn parse_header(h: &[u8; BLOCK], index: u64) -> Result<Option<Member>> {
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let Some(stored) = octal(&h[148..156]) else {
        bail!("the header of member {index} has a malformed checksum field");
    };
    // The checksum counts its own field as eight spaces.
    let sum: u64 = h[..148]
        .iter()
        .chain(&[b' '; 8])
        .chain(&h[156..])
        .map(|&b| u64::from(b))
        .sum();
    if stored != sum {
        bail!("the header of member {index} has a bad checksum");
    }
    // POSIX ustar, or GNU's magic (whose extensions are refused by their type flags).
    if &h[257..265] != b"ustar\x0000" && &h[257..265] != b"ustar  \0" {
        bail!("member {index} does not have a ustar header");
    }
    let field = &h[..100];
    let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let name = &field[..len];
    let shown = quote(name);
    let flag = h[156];
    if flag != b'0' && flag != 0 {
        bail!(
            "member {index} (`{shown}`) is {}, which a delta never has",
            kind_name(flag)
        );
    }
    if name.is_empty() {
        bail!("member {index} has an empty name");
    }
    if field[len..].iter().any(|&b| b != 0) {
        bail!("member {index} (`{shown}`) has bytes after the NUL that ends its name");
    }
    if h[345..500].iter().any(|&b| b != 0) {
        bail!("member {index} (`{shown}`) has a name prefix, which a delta never has");
    }
    if h[157..257].iter().any(|&b| b != 0) {
        bail!("member {index} (`{shown}`) has a link name, which a delta never has");
    }
    let Some(size) = size_field(&h[124..136]) else {
        bail!("member {index} (`{shown}`) has a malformed size field");
    };
    Ok(Some(Member {
        name: name.to_vec(),
        size,
    }))
}

/// A numeric field in octal: optional leading spaces, at least one octal digit, then only
/// NULs and spaces.
fn octal(f: &[u8]) -> Option<u64> {
    let start = f.iter().position(|&b| b != b' ')?;
    let digits = f[start..]
        .iter()
        .position(|b| !(b'0'..=b'7').contains(b))
        .unwrap_or(f.len() - start);
    if digits == 0 || f[start + digits..].iter().any(|&b| b != 0 && b != b' ') {
        return None;
    }
    let mut n: u64 = 0;
    for &b in &f[start..start + digits] {
        n = n.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// The size field: octal, or GNU's base-256 (first byte 0x80, then big-endian) for sizes of
/// 8 GiB and more, as writers use it; negative and out-of-range sizes are refused.
fn size_field(f: &[u8]) -> Option<u64> {
    if f[0] == 0x80 {
        let (high, low) = f[1..].split_at(f.len() - 9);
        if high.iter().any(|&b| b != 0) {
            return None;
        }
        return Some(u64::from_be_bytes(low.try_into().ok()?));
    }
    octal(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header as `treeswap diff` writes one (the `tar` crate's `new_ustar`).
    fn header(name: &[u8], size: u64, flag: u8) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = flag;
        h[257..265].copy_from_slice(b"ustar\x0000");
        fix_checksum(&mut h);
        h
    }

    fn fix_checksum(h: &mut [u8; BLOCK]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn archive(members: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in members {
            out.extend_from_slice(&header(name, data.len() as u64, b'0'));
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        }
        out.extend_from_slice(&[0; 2 * BLOCK]);
        out
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::new();
        while let Some(m) = r.next()? {
            let mut data = Vec::new();
            r.read_to_end(&mut data)?;
            assert_eq!(data.len() as u64, m.size);
            out.push((m.name, data));
        }
        Ok(out)
    }

    #[test]
    fn reads_members_in_order_and_ends() {
        let a = archive(&[
            (b"delta.toml", b"format = 1\n"),
            (b"delta.toml.minisig", b""),
        ]);
        let got = read_all(&a).unwrap();
        assert_eq!(got[0], (b"delta.toml".to_vec(), b"format = 1\n".to_vec()));
        assert_eq!(got[1], (b"delta.toml.minisig".to_vec(), Vec::new()));
        // Without the end blocks, and with garbage after both of them.
        read_all(&a[..a.len() - 2 * BLOCK]).unwrap();
        let mut g = a.clone();
        g.extend_from_slice(&[0xff; 100]);
        read_all(&g).unwrap();
        // Garbage in the second end block.
        let mut g = a.clone();
        let n = g.len();
        g[n - 10] = 1;
        let e = read_all(&g).unwrap_err().to_string();
        assert!(e.contains("after the end-of-archive block"), "{e}");
    }

    #[test]
    fn unread_data_and_padding_are_skipped() {
        let a = archive(&[(b"a", &[7u8; 700]), (b"b", b"x")]);
        let mut r = Reader::new(&a[..]);
        assert_eq!(r.next().unwrap().unwrap().size, 700);
        let m = r.next().unwrap().unwrap();
        assert_eq!(m.name, b"b");
    }

    #[test]
    fn refuses_every_kind_but_a_regular_file_from_its_header() {
        for (flag, what) in [
            (b'L', "GNU long-name"),
            (b'K', "GNU long-link-name"),
            (b'x', "PAX extended header"),
            (b'g', "PAX global header"),
            (b'1', "hard link"),
            (b'2', "symbolic link"),
            (b'3', "character device"),
            (b'4', "block device"),
            (b'5', "directory"),
            (b'6', "FIFO"),
            (b'Z', "unknown type"),
        ] {
            // A header that declares 2^32 bytes of data, which are not there: it must be
            // refused without reading them.
            let mut h = header(b"././@LongLink", 0, flag);
            h[124..136].copy_from_slice(b"\x80\0\0\0\0\0\0\x01\0\0\0\0");
            fix_checksum(&mut h);
            let e = read_all(&h).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("member 1"), "{e}");
        }
        read_all(&header(b"a", 0, 0)).unwrap();
    }

    #[test]
    fn refuses_malformed_headers() {
        let good = header(b"delta.toml", 3, b'0');
        type Change = dyn Fn(&mut [u8; BLOCK]);
        let cases: [(&Change, &str); 9] = [
            (&|h| h[0] = b'e', "bad checksum"),
            (
                &|h| h[148..156].copy_from_slice(b"12x4\0   "),
                "checksum field",
            ),
            (&|h| h[257] = b'x', "ustar"),
            (&|h| h[50] = b'x', "after the NUL"),
            (&|h| h[345] = b'p', "name prefix"),
            (&|h| h[157] = b'l', "link name"),
            (
                &|h| h[124..136].copy_from_slice(b"12345678901x"),
                "size field",
            ),
            (
                &|h| {
                    h[124..136].copy_from_slice(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
                },
                "size field",
            ),
            (&|h| h[..100].fill(0), "empty name"),
        ];
        for (change, want) in cases {
            let mut h = good;
            change(&mut h);
            if want != "bad checksum" && want != "checksum field" {
                fix_checksum(&mut h);
            }
            let e = parse_header(&h, 1).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        // Base-256 sizes beyond u64 are refused; within it they are read.
        let mut h = good;
        h[124..136].copy_from_slice(b"\x80\0\0\x01\0\0\0\0\0\0\0\0");
        fix_checksum(&mut h);
        assert!(parse_header(&h, 1).is_err());
        h[124..136].copy_from_slice(b"\x80\0\0\0\0\0\0\x02\0\0\0\0");
        fix_checksum(&mut h);
        assert_eq!(parse_header(&h, 1).unwrap().unwrap().size, 1 << 33);
    }

    #[test]
    fn a_long_name_is_quoted_briefly() {
        let mut h = header(&[b'a'; 100], 0, b'5');
        fix_checksum(&mut h);
        let e = parse_header(&h, 2).unwrap_err().to_string();
        assert!(e.len() < 200 && e.contains('…'), "{e}");
    }

    #[test]
    fn truncation_is_an_error_not_the_end() {
        let a = archive(&[(b"a", &[7u8; 700])]);
        for cut in [100, BLOCK + 10, BLOCK + 700, BLOCK + 800] {
            assert!(read_all(&a[..cut]).is_err(), "cut at {cut}");
        }
    }
}
