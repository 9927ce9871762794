//! Identities: the numeric handle of a process in this node's table, its optional
//! name, selectors over both, and the Kinode-style hierarchical ids.
//!
//! Numeric ids are unique and never reused within a node's table. Names are
//! optional and may repeat, so an action by name applies to every process that
//! bears it. A name may not be all digits (it would read as an id) nor `all`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Longest accepted process name or id segment; long enough for any sensible
/// name, short enough to keep tables readable.
pub const MAX_NAME_LEN: usize = 64;

/// The unique number of a process in a node's table (what `ls` calls `id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProcessNum(pub u64);

impl fmt::Display for ProcessNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An id, name or selector that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("empty name: give a name such as `api`, or leave the name out")]
    EmptyName,
    #[error("name {0:?} is all digits and would read as an id: add a letter, e.g. `worker-{0}`")]
    NumericName(String),
    #[error("name `all` is reserved for `--all`: choose another name")]
    ReservedName,
    /// `name` is at most its beginning ([`shown`]).
    #[error("name {name:?} is too long ({len} bytes, at most {MAX_NAME_LEN})")]
    NameTooLong { name: String, len: usize },
    #[error(
        "name {0:?} has a character outside letters, digits, `-`, `_` and `.`: rename it, e.g. `my-api`"
    )]
    BadNameChar(String),
    #[error(
        "invalid {what} {text:?}: expected {shape} (segments of a-z, 0-9, `-`, `_`, `.`), e.g. {example}"
    )]
    BadId {
        what: &'static str,
        text: String,
        shape: &'static str,
        example: &'static str,
    },
}

/// Bytes of a rejected text an error quotes: enough to recognise it, and
/// an error never grows with the input that caused it.
pub const SHOWN_BYTES: usize = 256;

/// A rejected text as an error quotes it: its first [`SHOWN_BYTES`], with
/// `…` if it was cut.
pub fn shown(text: &str) -> String {
    crate::fault::cut(text, SHOWN_BYTES)
}

/// Checks a process name against the naming rules.
pub fn validate_name(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(IdError::NameTooLong {
            name: shown(name),
            len: name.len(),
        });
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdError::NumericName(name.into()));
    }
    if name == "all" {
        return Err(IdError::ReservedName);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(IdError::BadNameChar(name.into()));
    }
    Ok(())
}

/// Which processes an action applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    All,
    Id(ProcessNum),
    Name(String),
}

impl FromStr for Selector {
    type Err = IdError;
    /// `all`, a number (an id) or a name.
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s == "all" {
            return Ok(Selector::All);
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse() {
                Ok(n) => Ok(Selector::Id(ProcessNum(n))),
                Err(_) => Err(IdError::NumericName(s.into())),
            };
        }
        validate_name(s)?;
        Ok(Selector::Name(s.into()))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("all"),
            Selector::Id(n) => write!(f, "{n}"),
            Selector::Name(s) => f.write_str(s),
        }
    }
}

/// The node name every node answers to: `local@…` always means this node,
/// whatever its own name (`spindle node init --name`).
pub const LOCAL_NODE: &str = "local";

/// Checks a node's name (`spindle node init --name`, a peer's name): an id
/// segment, and not [`LOCAL_NODE`].
pub fn validate_node_name(name: &str) -> Result<(), IdError> {
    if name == LOCAL_NODE {
        return Err(IdError::BadId {
            what: "node name",
            text: name.into(),
            shape: "a name other than `local`, which always means this node",
            example: "`alice`",
        });
    }
    if !valid_segment(name) {
        return Err(IdError::BadId {
            what: "node name",
            text: shown(name),
            shape: "one segment",
            example: "`alice` or `build-box.os`",
        });
    }
    Ok(())
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

fn segments<'a, const N: usize>(
    text: &'a str,
    what: &'static str,
    shape: &'static str,
    example: &'static str,
) -> Result<[&'a str; N], IdError> {
    let bad = || IdError::BadId {
        what,
        text: shown(text),
        shape,
        example,
    };
    let parts: Vec<&str> = text.split(':').collect();
    let arr: [&str; N] = parts.try_into().map_err(|_| bad())?;
    if arr.iter().all(|s| valid_segment(s)) {
        Ok(arr)
    } else {
        Err(bad())
    }
}

/// `package:publisher`
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PackageId {
    pub package: String,
    pub publisher: String,
}

/// `process:package:publisher`
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProcessId {
    pub process: String,
    pub package: PackageId,
}

/// `node@process:package:publisher`
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Address {
    pub node: String,
    pub process: ProcessId,
}

impl PackageId {
    /// `sys:spindle`: the node's own processes (the kernel, CLI senders,
    /// runtime modules). No user process can be started in it.
    pub fn system() -> PackageId {
        PackageId {
            package: spindle_abi::SYSTEM_PACKAGE.into(),
            publisher: spindle_abi::SYSTEM_PUBLISHER.into(),
        }
    }

    pub fn is_system(&self) -> bool {
        self.package == spindle_abi::SYSTEM_PACKAGE
            && self.publisher == spindle_abi::SYSTEM_PUBLISHER
    }
}

impl FromStr for PackageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let [package, publisher] =
            segments::<2>(s, "package id", "package:publisher", "`chat:alice.os`")?;
        Ok(PackageId {
            package: package.into(),
            publisher: publisher.into(),
        })
    }
}

impl FromStr for ProcessId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let [process, package, publisher] = segments::<3>(
            s,
            "process id",
            "process:package:publisher",
            "`counter:demo:spindle.os`",
        )?;
        Ok(ProcessId {
            process: process.into(),
            package: PackageId {
                package: package.into(),
                publisher: publisher.into(),
            },
        })
    }
}

impl FromStr for Address {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadId {
            what: "address",
            text: shown(s),
            shape: "node@process:package:publisher",
            example: "`local.os@counter:demo:spindle.os`",
        };
        let (node, rest) = s.split_once('@').ok_or_else(bad)?;
        if !valid_segment(node) {
            return Err(bad());
        }
        let process: ProcessId = rest.parse().map_err(|_| bad())?;
        Ok(Address {
            node: node.into(),
            process,
        })
    }
}

impl fmt::Display for PackageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.package, self.publisher)
    }
}
impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.process, self.package)
    }
}
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.node, self.process)
    }
}

macro_rules! string_conversions {
    ($($t:ty),*) => {$(
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> { s.parse() }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String { v.to_string() }
        }
    )*};
}
string_conversions!(PackageId, ProcessId, Address);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn selectors() {
        assert_eq!("all".parse::<Selector>().unwrap(), Selector::All);
        assert_eq!(
            "17".parse::<Selector>().unwrap(),
            Selector::Id(ProcessNum(17))
        );
        assert_eq!(
            "api".parse::<Selector>().unwrap(),
            Selector::Name("api".into())
        );
        assert!("a b".parse::<Selector>().is_err());
        assert!("".parse::<Selector>().is_err());
        assert!("99999999999999999999999".parse::<Selector>().is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("web-1.a_b").is_ok());
        assert_eq!(validate_name("42"), Err(IdError::NumericName("42".into())));
        assert_eq!(validate_name("all"), Err(IdError::ReservedName));
        assert!(validate_name(&"x".repeat(65)).is_err());
        assert!(validate_name("a/b").is_err());
    }

    #[test]
    fn kinode_ids() {
        let a: Address = "alice.os@counter:demo:spindle.os".parse().unwrap();
        assert_eq!(a.node, "alice.os");
        assert_eq!(a.process.process, "counter");
        assert_eq!(a.process.package.to_string(), "demo:spindle.os");
        assert_eq!(a.to_string(), "alice.os@counter:demo:spindle.os");
        for bad in [
            "counter:demo:spindle.os",
            "a@b:c",
            "a@b:c:d:e",
            "a@B:c:d",
            "@b:c:d",
            "a@b::d",
        ] {
            let err = bad.parse::<Address>().unwrap_err().to_string();
            assert!(err.contains("node@process:package:publisher"), "{err}");
        }
        assert!("x:y".parse::<PackageId>().is_ok());
        assert!("x".parse::<PackageId>().is_err());
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-z0-9_.-]{1,12}"
    }

    proptest! {
        #[test]
        fn address_round_trips(n in segment(), p in segment(), k in segment(), u in segment()) {
            let text = format!("{n}@{p}:{k}:{u}");
            let a: Address = text.parse().unwrap();
            prop_assert_eq!(a.to_string(), text);
            let json = serde_json::to_string(&a).unwrap();
            let back: Address = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, a);
        }

        #[test]
        fn parsing_never_panics(s in ".{0,40}") {
            let _ = s.parse::<Address>();
            let _ = s.parse::<Selector>();
        }
    }
}
