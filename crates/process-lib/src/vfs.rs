//! The node's file module as Rust calls: each is a request to
//! `<node>@vfs:sys:spindle` (bodies JSON, contents in blobs), so they work
//! the same from a wasm process and from a native one.
//!
//! ```ignore
//! let d = vfs::drive("files")?;                 // this package's drive, made if missing
//! d.write("a/b.txt", b"hello".to_vec())?;       // atomic, durable when it returns
//! d.append("log", b"one more line\n".to_vec())?; // durable when it returns
//! let part = d.read_range("big.bin", 1 << 30, 4096)?;
//! for e in d.list("a")? { /* e.name, e.kind, e.size */ }
//! d.grant(&other, Access::Read)?;               // another package may read it
//! let theirs = vfs::Drive::of("other:pub", "shared"); // needs their grant
//! ```
//!
//! Paths inside a drive are relative (`a/b.txt`); `..`, empty names and
//! symlinks are refused by the node. There is no cursor: every read names
//! its range.

use crate::{Access, Address};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

/// How long a file call waits for the module (a write waits for its sync).
pub const VFS_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed file call: `kind` as the module names it (`not-found`,
/// `no-access`, `quota`, `disk-full`, `read-only`, `storage`,
/// `over-budget`, `bad-request`), or a send error's kind.
pub type VfsError = crate::ModuleError;

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// `file`, `dir` or `other`.
    pub kind: String,
    pub size: u64,
    /// Milliseconds since the Unix epoch.
    pub modified_ms: u64,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Entry {
    pub name: String,
    pub kind: String,
    pub size: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Answer {
    error: Option<String>,
    message: String,
    size: u64,
    kind: String,
    modified_ms: u64,
    entries: Vec<Entry>,
}

/// A drive: `/<package>/<drive>` on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    package: String,
    name: String,
}

/// This package's drive `name`, made if it is not there yet.
pub fn drive(name: &str) -> Result<Drive, VfsError> {
    let our = crate::our();
    let d = Drive {
        package: format!("{}:{}", our.package(), our.publisher()),
        name: name.into(),
    };
    d.call(json!({"op": "create_drive", "drive": name}), None)?;
    Ok(d)
}

impl Drive {
    /// Another package's drive (`package` as `name:publisher`): reading or
    /// writing it needs that package's grant.
    pub fn of(package: &str, name: &str) -> Drive {
        Drive {
            package: package.into(),
            name: name.into(),
        }
    }

    /// The full path of `rel` in this drive, as the module names it.
    pub fn path(&self, rel: &str) -> String {
        let rel = rel.trim_matches('/');
        if rel.is_empty() {
            format!("/{}/{}", self.package, self.name)
        } else {
            format!("/{}/{}/{rel}", self.package, self.name)
        }
    }

    fn call(
        &self,
        body: serde_json::Value,
        blob: Option<Vec<u8>>,
    ) -> Result<(Answer, Option<Vec<u8>>), VfsError> {
        let msg = crate::module::call(spindle_abi::module::VFS, &body, blob, VFS_TIMEOUT)?;
        let answer: Answer = msg.json().map_err(VfsError::bad_response)?;
        if let Some(e) = VfsError::refused(&answer.error, &answer.message) {
            return Err(e);
        }
        // Only a read answers with contents; they cross into the process now.
        let blob = if body["op"] == "read" {
            crate::get_blob().map(|b| b.bytes)
        } else {
            None
        };
        Ok((answer, blob))
    }

    fn on(&self, op: &str, rel: &str) -> serde_json::Value {
        json!({"op": op, "path": self.path(rel)})
    }

    /// Replaces `rel` with `bytes`: old or new after any crash, durable
    /// when it returns.
    pub fn write(&self, rel: &str, bytes: Vec<u8>) -> Result<(), VfsError> {
        self.call(self.on("write", rel), Some(bytes)).map(|_| ())
    }

    /// Appends `bytes` to `rel` (made if missing), durable when it returns:
    /// the file's new size.
    pub fn append(&self, rel: &str, bytes: Vec<u8>) -> Result<u64, VfsError> {
        self.call(self.on("append", rel), Some(bytes))
            .map(|(a, _)| a.size)
    }

    /// All of `rel` (up to the module's 16 MiB per read; larger files are
    /// read with [`Drive::read_range`]).
    pub fn read(&self, rel: &str) -> Result<Vec<u8>, VfsError> {
        self.call(self.on("read", rel), None)
            .map(|(_, b)| b.unwrap_or_default())
    }

    /// `length` bytes of `rel` from `offset` (fewer at its end).
    pub fn read_range(&self, rel: &str, offset: u64, length: u64) -> Result<Vec<u8>, VfsError> {
        let mut body = self.on("read", rel);
        body["offset"] = offset.into();
        body["length"] = length.into();
        self.call(body, None).map(|(_, b)| b.unwrap_or_default())
    }

    pub fn metadata(&self, rel: &str) -> Result<Metadata, VfsError> {
        self.call(self.on("metadata", rel), None)
            .map(|(a, _)| Metadata {
                kind: a.kind,
                size: a.size,
                modified_ms: a.modified_ms,
            })
    }

    /// The directory `rel` (`""`: the drive's root), by name.
    pub fn list(&self, rel: &str) -> Result<Vec<Entry>, VfsError> {
        self.call(self.on("list", rel), None)
            .map(|(a, _)| a.entries)
    }

    /// Makes directory `rel` and its parents.
    pub fn mkdir(&self, rel: &str) -> Result<(), VfsError> {
        self.call(self.on("mkdir", rel), None).map(|_| ())
    }

    pub fn remove(&self, rel: &str) -> Result<(), VfsError> {
        self.call(self.on("remove", rel), None).map(|_| ())
    }

    /// Removes the empty directory `rel`.
    pub fn remove_dir(&self, rel: &str) -> Result<(), VfsError> {
        self.call(self.on("remove_dir", rel), None).map(|_| ())
    }

    /// Removes `rel` and everything in it.
    pub fn remove_tree(&self, rel: &str) -> Result<(), VfsError> {
        self.call(self.on("remove_tree", rel), None).map(|_| ())
    }

    /// Renames `from` to `to` in this drive (a file at `to` is replaced).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), VfsError> {
        let mut body = self.on("rename", from);
        body["to"] = self.path(to).into();
        self.call(body, None).map(|_| ())
    }

    /// Copies `from` to `to` (in `dest`, which may be another drive).
    pub fn copy(&self, from: &str, dest: &Drive, to: &str) -> Result<u64, VfsError> {
        let mut body = self.on("copy", from);
        body["to"] = dest.path(to).into();
        self.call(body, None).map(|(a, _)| a.size)
    }

    /// Lets `to` read (or read and write) this drive.
    pub fn grant(&self, to: &Address, access: Access) -> Result<(), VfsError> {
        self.grant_op("grant", to, access)
    }

    pub fn revoke(&self, to: &Address, access: Access) -> Result<(), VfsError> {
        self.grant_op("revoke", to, access)
    }

    fn grant_op(&self, op: &str, to: &Address, access: Access) -> Result<(), VfsError> {
        self.call(
            json!({"op": op, "drive": self.name, "to": to.as_str(), "access": access.name()}),
            None,
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_package_and_drive() {
        let d = Drive::of("demo:spindle", "files");
        assert_eq!(d.path("a/b.txt"), "/demo:spindle/files/a/b.txt");
        assert_eq!(d.path("/a/"), "/demo:spindle/files/a");
        assert_eq!(d.path(""), "/demo:spindle/files");
    }
}
