//! Paths as processes give them: `/<package>/<drive>/a/b`, checked before
//! anything touches the disk.
//!
//! A path is absolute in the vfs's own namespace and names its package and
//! drive first; what follows is relative to the drive. Every component is
//! checked: no empty ones, no `.` or `..`, no NUL, no control characters,
//! at most [`MAX_NAME`] bytes each, [`MAX_DEPTH`] deep, [`MAX_PATH`] bytes
//! in all. What is left is confined to the drive by construction, and the
//! opening of it refuses symlinks anyway ([`crate::fs`]).

use spindle_types::PackageId;

/// Longest drive name (a directory name).
pub const MAX_DRIVE: usize = 64;
/// Longest component of a path inside a drive (a file or directory name,
/// as Linux allows).
pub const MAX_NAME: usize = 255;
/// Components below a drive.
pub const MAX_DEPTH: usize = 64;
/// Bytes of a whole path.
pub const MAX_PATH: usize = 4096;

/// A checked path: the drive, and the components below it (none: the
/// drive's root).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VfsPath {
    pub package: PackageId,
    pub drive: String,
    pub parts: Vec<String>,
}

/// Why a path was refused (the message says what to send instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?}: give /<package>/<drive>/<path>, e.g. /demo:spindle/files/a.txt")]
    Shape(String),
    #[error("path is {0} bytes: at most {MAX_PATH}")]
    TooLong(usize),
    #[error("package {shown:?} in the path: {why}")]
    Package { shown: String, why: String },
    #[error("drive name {0:?}: use 1–{MAX_DRIVE} of a-z, 0-9, '-', '_'")]
    Drive(String),
    #[error("{0:?} in a path: `.`, `..` and empty components are not allowed")]
    Dots(String),
    #[error("a name in the path is {0} bytes: at most {MAX_NAME}")]
    NameTooLong(usize),
    #[error("a name in the path holds a NUL or control character")]
    Control,
    #[error("the path is {0} deep below its drive: at most {MAX_DEPTH}")]
    TooDeep(usize),
}

/// Checks a drive name (also a directory name on disk).
pub fn check_drive(name: &str) -> Result<(), PathError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_DRIVE
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PathError::Drive(spindle_types::id::shown(name)))
    }
}

/// Checks one component below a drive.
pub fn check_name(name: &str) -> Result<(), PathError> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(PathError::Dots(name.into()));
    }
    if name.len() > MAX_NAME {
        return Err(PathError::NameTooLong(name.len()));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(PathError::Control);
    }
    Ok(())
}

impl VfsPath {
    /// Parses `/<package>/<drive>[/a/b…]` (the leading `/` may be left
    /// out, as the CLI allows; a trailing `/` is ignored).
    pub fn parse(text: &str) -> Result<VfsPath, PathError> {
        if text.len() > MAX_PATH {
            return Err(PathError::TooLong(text.len()));
        }
        let rest = text.strip_prefix('/').unwrap_or(text);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut it = rest.split('/');
        let (Some(package), Some(drive)) = (it.next(), it.next()) else {
            return Err(PathError::Shape(spindle_types::id::shown(text)));
        };
        let package: PackageId = package.parse().map_err(|e| PathError::Package {
            shown: spindle_types::id::shown(package),
            why: format!("{e}"),
        })?;
        check_drive(drive)?;
        let mut parts = Vec::new();
        for p in it {
            check_name(p)?;
            parts.push(p.to_string());
            if parts.len() > MAX_DEPTH {
                return Err(PathError::TooDeep(parts.len()));
            }
        }
        Ok(VfsPath {
            package,
            drive: drive.into(),
            parts,
        })
    }

    /// Whether this is the drive's root.
    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    /// The path below the drive, as `a/b` (`.` for the root): what is
    /// opened relative to the drive's directory.
    pub fn relative(&self) -> String {
        if self.parts.is_empty() {
            ".".into()
        } else {
            self.parts.join("/")
        }
    }

    /// The parent's relative path and the last name (`None` for the root).
    pub fn split_last(&self) -> Option<(String, &str)> {
        let (last, parent) = self.parts.split_last()?;
        let parent = if parent.is_empty() {
            ".".into()
        } else {
            parent.join("/")
        };
        Some((parent, last.as_str()))
    }
}

impl std::fmt::Display for VfsPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}/{}", self.package, self.drive)?;
        for p in &self.parts {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_paths_parse_and_print_back() {
        let p = VfsPath::parse("/demo:spindle/files/a/b.txt").unwrap();
        assert_eq!(p.drive, "files");
        assert_eq!(p.parts, ["a", "b.txt"]);
        assert_eq!(p.to_string(), "/demo:spindle/files/a/b.txt");
        assert_eq!(p.relative(), "a/b.txt");
        assert_eq!(p.split_last(), Some(("a".into(), "b.txt")));
        let root = VfsPath::parse("demo:spindle/files/").unwrap();
        assert!(root.is_root());
        assert_eq!(root.relative(), ".");
    }

    #[test]
    fn escapes_and_bad_names_are_refused() {
        for bad in [
            "/demo:spindle/files/../x",
            "/demo:spindle/files/a/./b",
            "/demo:spindle/files//b",
            "/demo:spindle/../files/b",
            "/demo:spindle",
            "/",
            "",
            "/nopublisher/files/a",
            "/demo:spindle/Files/a",
            "/demo:spindle/files/a\0b",
            "/demo:spindle/files/a\nb",
        ] {
            assert!(VfsPath::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let deep = format!("/demo:spindle/files/{}", vec!["d"; MAX_DEPTH + 1].join("/"));
        assert_eq!(
            VfsPath::parse(&deep).unwrap_err(),
            PathError::TooDeep(MAX_DEPTH + 1)
        );
        let long = format!("/demo:spindle/files/{}", "n".repeat(MAX_NAME + 1));
        assert!(matches!(
            VfsPath::parse(&long).unwrap_err(),
            PathError::NameTooLong(_)
        ));
    }

    proptest! {
        /// Whatever a process sends, parsing never panics, and what it
        /// accepts has no component that could leave the drive, and prints
        /// back to a path that parses to the same thing.
        #[test]
        fn accepted_paths_stay_in_their_drive(text in "\\PC{0,80}", parts in proptest::collection::vec("[a-z./\\\\]{0,4}", 0..6)) {
            for candidate in [text.clone(), format!("/demo:spindle/files/{}", parts.join("/"))] {
                if let Ok(p) = VfsPath::parse(&candidate) {
                    for c in &p.parts {
                        prop_assert!(c != "." && c != ".." && !c.is_empty() && !c.contains('/'));
                    }
                    prop_assert_eq!(VfsPath::parse(&p.to_string()).unwrap(), p);
                }
            }
        }
    }
}
