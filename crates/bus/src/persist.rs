//! Capabilities on disk, so grants outlive the daemon.
//!
//! The capability table lives in memory and is written whole to
//! `capabilities.json` (via [`spindle_store::write_durable`]) by a writer
//! thread of its own. Every change bumps a generation number and wakes the
//! writer; the writer snapshots the table and writes it, so a burst of changes
//! costs one write (group commit) and no change ever waits on the disk while
//! holding the table's lock. Whoever must know that a change is durable —
//! a process whose `save-capabilities` or `spawn` is about to return — awaits
//! [`Bus::persisted`](crate::Bus::persisted), which waits for the generation
//! of the latest change.
//!
//! A failed write (a full disk) is retried every [`RETRY_EVERY`]; waiters are
//! told it failed, and the in-memory table keeps working meanwhile.

use crate::{Capability, Caps};
use spindle_types::ProcessId;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;
use tokio::sync::watch;

/// Capability changes in effect in memory but not (yet) on disk: why the
/// last write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotSaved(pub String);

/// Version of `capabilities.json`; a newer file is refused, not misread.
pub const CAPS_VERSION: u32 = 1;
/// How often a write that failed is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

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
    #[error("cannot start the capability writer: {0}")]
    Thread(std::io::Error),
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

/// The outcome of the writer's latest attempt.
#[derive(Debug, Clone, Default)]
struct Written {
    /// The generation the attempt covered.
    generation: u64,
    /// `None` if it is on disk.
    error: Option<String>,
}

/// Keeps `capabilities.json` in step with the table. See the module docs.
#[derive(Debug)]
pub(crate) struct Persister {
    changed: Arc<AtomicU64>,
    wake: mpsc::Sender<()>,
    written: watch::Receiver<Written>,
}

/// Reads `capabilities.json`: a missing file is an empty table; a corrupt one
/// is moved aside (and reported), a newer one refused.
pub(crate) fn load(path: &Path) -> Result<Caps, CapsFileError> {
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

fn encode(caps: &Caps) -> Vec<u8> {
    let mut holders: Vec<Holder> = caps
        .iter()
        .filter(|(_, set)| !set.is_empty())
        .map(|(process, set)| {
            let mut capabilities: Vec<Capability> = set.iter().cloned().collect();
            capabilities.sort_by(|a, b| (&a.issuer, &a.params).cmp(&(&b.issuer, &b.params)));
            Holder {
                process: process.clone(),
                capabilities,
            }
        })
        .collect();
    holders.sort_by_key(|h| h.process.to_string());
    serde_json::to_vec_pretty(&File {
        version: CAPS_VERSION,
        holders,
    })
    .expect("capabilities serialise")
}

impl Persister {
    /// Starts the writer thread for `caps`, kept in `path`.
    pub(crate) fn start(
        path: PathBuf,
        caps: Arc<std::sync::RwLock<Caps>>,
    ) -> Result<Persister, CapsFileError> {
        let (wake, woken) = mpsc::channel::<()>();
        let (tell, written) = watch::channel(Written::default());
        let changed = Arc::new(AtomicU64::new(0));
        let counter = changed.clone();
        std::thread::Builder::new()
            .name("spindle-caps".into())
            .spawn(move || writer(&path, &caps, &counter, woken, tell))
            .map_err(CapsFileError::Thread)?;
        Ok(Persister {
            changed,
            wake,
            written,
        })
    }

    /// Records a change (made before this call) for the writer.
    pub(crate) fn changed(&self) {
        self.changed.fetch_add(1, Ordering::AcqRel);
        let _ = self.wake.send(());
    }

    /// The generation of the latest change.
    pub(crate) fn latest(&self) -> u64 {
        self.changed.load(Ordering::Acquire)
    }

    /// Waits until every change up to `generation` is on disk, or a write
    /// covering it failed.
    pub(crate) async fn durable(&self, generation: u64) -> Result<(), NotSaved> {
        let mut rx = self.written.clone();
        loop {
            {
                let w = rx.borrow_and_update();
                if w.generation >= generation {
                    return w.error.clone().map_or(Ok(()), |why| Err(NotSaved(why)));
                }
            }
            if rx.changed().await.is_err() {
                return Err(NotSaved("the capability writer has stopped".into()));
            }
        }
    }
}

/// The writer thread: waits for changes, writes the latest table, reports.
/// Ends (after a last write, if one is due) when the bus is dropped.
fn writer(
    path: &Path,
    caps: &std::sync::RwLock<Caps>,
    changed: &AtomicU64,
    woken: mpsc::Receiver<()>,
    tell: watch::Sender<Written>,
) {
    let mut on_disk = 0;
    let mut failing = false;
    loop {
        let closed = if failing {
            matches!(
                woken.recv_timeout(RETRY_EVERY),
                Err(mpsc::RecvTimeoutError::Disconnected)
            )
        } else {
            woken.recv().is_err()
        };
        // Coalesce: everything that changed until now goes into this write.
        while woken.try_recv().is_ok() {}
        let generation = changed.load(Ordering::Acquire);
        if generation != on_disk {
            let bytes = encode(&caps.read().unwrap_or_else(|p| p.into_inner()));
            match spindle_store::write_durable(path, &bytes) {
                Ok(()) => {
                    on_disk = generation;
                    if failing {
                        tracing::info!("capabilities written to {} again", path.display());
                    }
                    failing = false;
                    tell.send_replace(Written {
                        generation,
                        error: None,
                    });
                }
                Err(e) => {
                    let error = format!(
                        "cannot write {}: {e} (capabilities stay in effect in memory; retrying every {}s)",
                        path.display(),
                        RETRY_EVERY.as_secs()
                    );
                    if !failing {
                        tracing::error!("{error}");
                    }
                    failing = true;
                    tell.send_replace(Written {
                        generation,
                        error: Some(error),
                    });
                }
            }
        }
        if closed {
            return;
        }
    }
}
