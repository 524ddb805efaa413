//! Objects: what lives on an inode, and the id that names it in the pool.
//!
//! Two files may share an inode only if everything that lives on the inode matches: content,
//! permission bits, owner, group and extended attributes. So the object id covers all of them
//! (FORMAT.md, "Object id"); timestamps are not part of it.

use sha2::{Digest, Sha256};

/// A sha256 digest: of a file's content, of a tree (its manifest digest), of a delta.
pub type Hash = [u8; 32];

/// An object id: sha256 over the object header and the content's sha256.
pub type ObjectId = [u8; 32];

/// Extended attributes, sorted by name: (name, value).
pub type Xattrs = Vec<(Box<[u8]>, Box<[u8]>)>;

/// The metadata an entry carries besides its kind: permission bits (`0o7777`, setuid, setgid
/// and sticky included), owner, group, and extended attributes sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub xattrs: Xattrs,
}

impl Meta {
    /// The canonical encoding shared by the object id and the tree digest.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&self.mode.to_be_bytes());
        buf.extend_from_slice(&self.uid.to_be_bytes());
        buf.extend_from_slice(&self.gid.to_be_bytes());
        buf.extend_from_slice(&(self.xattrs.len() as u32).to_be_bytes());
        for (k, v) in &self.xattrs {
            buf.extend_from_slice(&(k.len() as u32).to_be_bytes());
            buf.extend_from_slice(k);
            buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
            buf.extend_from_slice(v);
        }
    }
}

/// The id of a regular file with this metadata and content.
pub fn object_id(meta: &Meta, size: u64, sha256: &Hash) -> ObjectId {
    let mut buf = Vec::with_capacity(96);
    buf.extend_from_slice(b"treeswap-object-v1\0");
    meta.encode(&mut buf);
    buf.extend_from_slice(&size.to_be_bytes());
    buf.extend_from_slice(sha256);
    Sha256::digest(&buf).into()
}

/// The first 16 hex digits of a digest and `…`: enough to tell digests apart in a message,
/// which stays one short line (the full ones are in the manifests, `show` and `status`).
pub(crate) fn short_hex(digest: &[u8]) -> String {
    format!("{}…", hex::encode(&digest[..digest.len().min(8)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_covers_every_inode_property() {
        let base = Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        };
        let id = object_id(&base, 1, &[0; 32]);
        let variants = vec![
            Meta {
                mode: 0o4755,
                ..base.clone()
            },
            Meta {
                uid: 1,
                ..base.clone()
            },
            Meta {
                gid: 1,
                ..base.clone()
            },
            Meta {
                xattrs: vec![((*b"security.capability").into(), (*b"x").into())],
                ..base.clone()
            },
        ];
        for m in variants {
            assert_ne!(object_id(&m, 1, &[0; 32]), id, "{m:?}");
        }
        assert_ne!(object_id(&base, 1, &[1; 32]), id);
    }
}
