//! # spindle-logs: line-exact process logs
//!
//! A process's output arrives in arbitrary chunks (a pipe read, a WASI write)
//! that split lines anywhere. A [`LineSink`] per output stream turns chunks
//! into whole lines: it writes every complete line in the chunk with one
//! `write` and holds the unfinished tail until its newline arrives (or it
//! reaches [`MAX_LINE`], when it is cut and written as a line of its own).
//! Nothing is written per line, and nothing is written that is not a line.
//!
//! Files are shared through a [`LogHub`]: every sink writing to one path holds
//! the same [`LogFile`], whose mutex makes each append atomic with respect to
//! the others — so processes merged into one file never interleave mid-line.
//! Rotation happens between appends (`file → file.1 → … → file.keep`), so it
//! never splits a line either.
//!
//! Optional shaping per line: ANSI escape stripping and an RFC 3339 UTC
//! timestamp prefix. A sink can also publish what it writes on a broadcast
//! channel (`logs --follow`); with nobody listening that costs one atomic load.

mod file;
mod sink;
mod tap;

pub use file::{LogFile, LogHub, probe, tail_lines};
pub use sink::{LineSink, LogChunk, Shaping, Stream};
pub use tap::{LogTap, TAP_CAPACITY};

/// Longest line kept whole. A longer run of bytes without a newline is cut
/// here and written as a line, so a process that never prints `\n` cannot
/// make the daemon buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;
