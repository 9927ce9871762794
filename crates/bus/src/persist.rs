//! Capabilities on disk, so grants outlive the daemon.
//!
//! The capability table lives in memory; a bus made with
//! [`Bus::open`](crate::Bus::open) also keeps it in the node's journal
//! ([`spindle_store::journal`]), one row per `(holder, capability)`. Every
//! grant and revocation stages its rows; they become durable with the next
//! commit, which groups whatever was staged meanwhile. Whoever must know a
//! change is durable — a process whose `save-capabilities` is about to
//! return — awaits [`Bus::persisted`](crate::Bus::persisted). A spawn may
//! return first, within the journal's
//! [`COMMIT_WINDOW`](spindle_store::journal::COMMIT_WINDOW).
//!
//! `capabilities.json`, the whole-file form earlier versions wrote, is read
//! once ([`load_legacy`]) and imported.

use crate::caps::Grants;
use crate::{Capability, Caps};
use spindle_types::{Address, ProcessId};
use std::path::{Path, PathBuf};

pub use spindle_store::journal::NotSaved;

/// The journal's kind for capability rows.
pub const KIND: &str = "capability";
/// Version of `capabilities.json`; a newer file is refused, not misread.
pub const CAPS_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CapsFileError {
    #[error(
        "{path} was written by a newer Spindle (capabilities version {found}, this one reads up to {CAPS_VERSION}): upgrade spindle"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
struct File {
    version: u32,
    holders: Vec<Holder>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Holder {
    process: ProcessId,
    capabilities: Vec<Capability>,
}

/// Reads `capabilities.json`: a missing file is an empty table; a corrupt one
/// is moved aside (and reported), a newer one refused.
pub fn load_legacy(path: &Path) -> Result<Caps, CapsFileError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Caps::default()),
        Err(source) => {
            return Err(CapsFileError::Read {
                path: path.into(),
                source,
            });
        }
    };
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    if let Ok(v) = serde_json::from_slice::<Version>(&text)
        && v.version > CAPS_VERSION
    {
        return Err(CapsFileError::TooNew {
            path: path.into(),
            found: v.version,
        });
    }
    match serde_json::from_slice::<File>(&text) {
        Ok(f) => Ok(f
            .holders
            .into_iter()
            .map(|h| (h.process, h.capabilities.into_iter().collect()))
            .collect()),
        Err(e) => {
            let aside = spindle_store::move_aside(path).map_err(|source| CapsFileError::Read {
                path: path.into(),
                source,
            })?;
            tracing::error!(
                "{} is not a valid capability table ({e}); moved it to {}: processes start without the capabilities they held",
                path.display(),
                aside.display()
            );
            Ok(Caps::default())
        }
    }
}

/// The row key of `holder` holding `cap`: `[holder, issuer, params]` as JSON.
/// A holder here is a process id; one on another node, an address (and the
/// row's value is the package here whose process gave it).
pub(crate) fn key(holder: &dyn std::fmt::Display, cap: &Capability) -> String {
    serde_json::to_string(&(holder.to_string(), cap.issuer.to_string(), &cap.params))
        .expect("strings serialise")
}

/// The table from its rows. A row that cannot be read is reported and left
/// out (it grants nothing); the rest stand.
pub(crate) fn from_rows(rows: &[(String, Vec<u8>)]) -> Grants {
    let mut caps = Grants::default();
    for (k, v) in rows {
        let parsed = serde_json::from_str::<(String, String, String)>(k)
            .map_err(|e| e.to_string())
            .and_then(|(holder, issuer, params)| {
                let issuer: Address = issuer.parse().map_err(|e| format!("{e}"))?;
                Ok((holder, Capability { issuer, params }))
            });
        match parsed {
            // A right given across nodes names the package that gave it;
            // one recorded without counts against its issuer's.
            Ok((holder, cap)) if holder.contains('@') => match holder.parse::<Address>() {
                Ok(h) => {
                    let giver = std::str::from_utf8(v)
                        .ok()
                        .and_then(|g| g.parse::<spindle_types::PackageId>().ok())
                        .unwrap_or_else(|| cap.issuer.process.package.clone());
                    caps.there.give(&h, cap, giver);
                }
                Err(e) => tracing::error!("capability row {k} in node.db: {e}; it is left out"),
            },
            Ok((holder, cap)) => match holder.parse::<ProcessId>() {
                Ok(h) => {
                    caps.here.insert(&h, cap);
                }
                Err(e) => tracing::error!("capability row {k} in node.db: {e}; it is left out"),
            },
            Err(why) => tracing::error!(
                "capability row {} in node.db cannot be read ({why}); it is left out",
                spindle_types::id::shown(k)
            ),
        }
    }
    caps
}
