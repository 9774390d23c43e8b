//! Namespaces (protocol §1.6): per-room-family options read from `NAMESPACES_FILE`.
//!
//! A room named `<ns>:<rest>` belongs to namespace `<ns>` (the text before the first `:`);
//! every other room, and a room whose namespace the file does not name, gets the default
//! namespace's options. The file is JSON:
//!
//! ```json
//! {
//!   "default": { "history_size": 500 },
//!   "namespaces": {
//!     "news":  { "client_publish": false },
//!     "lobby": { "member_events": false, "presence": false },
//!     "typing": { "history_size": 0 }
//!   }
//! }
//! ```
//!
//! Every field is optional: `history_size` and `history_ttl_seconds` override the global
//! `HISTORY_SIZE` / `HISTORY_TTL_SECONDS` (0 in either means no history and no recovery);
//! `presence`, `member_events` and `client_publish` default to `true`. Unknown fields and bad
//! namespace names are errors, so a typo stops the binary at start-up instead of being ignored.
//!
//! Every process reads the same file: the gateway applies `client_publish` and `presence` to
//! client commands, room-service the history bounds, presence and member events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The environment variable naming the file.
pub const NAMESPACES_FILE_ENV: &str = "NAMESPACES_FILE";

/// The options of one namespace, as the file gives them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceOptions {
    /// Most messages kept per room; `None`: the global `HISTORY_SIZE`; 0: no history.
    #[serde(default)]
    pub history_size: Option<usize>,
    /// Age after which messages are dropped; `None`: the global `HISTORY_TTL_SECONDS`;
    /// 0: no history.
    #[serde(default)]
    pub history_ttl_seconds: Option<u64>,
    /// Whether members may list the room's members (`presence` command). Off also turns
    /// `member_joined` / `member_left` off.
    #[serde(default = "yes")]
    pub presence: bool,
    /// Whether joins and leaves are announced to the room's members.
    #[serde(default = "yes")]
    pub member_events: bool,
    /// Whether clients may publish; off leaves publishing to the server API.
    #[serde(default = "yes")]
    pub client_publish: bool,
}

fn yes() -> bool {
    true
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        NamespaceOptions {
            history_size: None,
            history_ttl_seconds: None,
            presence: true,
            member_events: true,
            client_publish: true,
        }
    }
}

impl NamespaceOptions {
    /// Whether joins and leaves are announced: on only with presence on too.
    pub fn announces_members(&self) -> bool {
        self.member_events && self.presence
    }

    /// Whether rooms keep history: off when either bound is 0.
    pub fn keeps_history(&self) -> bool {
        self.history_size != Some(0) && self.history_ttl_seconds != Some(0)
    }
}

/// Why a namespaces file was refused.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    // The cause is part of the one-line message (not a `source`), so `{:#}` does not repeat it.
    #[error("NAMESPACES_FILE {}: cannot read: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("NAMESPACES_FILE {}: not a valid namespaces file: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error(
        "NAMESPACES_FILE {}: bad namespace name {name:?} (1-127 of A-Z a-z 0-9 _ . -, no ':')",
        path.display()
    )]
    BadName { path: PathBuf, name: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    default: NamespaceOptions,
    #[serde(default)]
    namespaces: HashMap<String, NamespaceOptions>,
}

/// Every namespace's options; [`Namespaces::default`] is one default namespace with the
/// global settings (no `NAMESPACES_FILE`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces {
    default: NamespaceOptions,
    named: HashMap<String, NamespaceOptions>,
}

impl Namespaces {
    /// Reads the file named by `NAMESPACES_FILE`; unset or empty: the default namespace only.
    pub fn from_env() -> Result<Self, NamespaceError> {
        match std::env::var_os(NAMESPACES_FILE_ENV) {
            Some(path) if !path.is_empty() => Self::from_file(Path::new(&path)),
            _ => Ok(Self::default()),
        }
    }

    /// Reads and checks a namespaces file.
    pub fn from_file(path: &Path) -> Result<Self, NamespaceError> {
        let text = std::fs::read_to_string(path).map_err(|error| NamespaceError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, NamespaceError> {
        let file: File = serde_json::from_str(text).map_err(|error| NamespaceError::Parse {
            path: path.to_owned(),
            error,
        })?;
        for name in file.namespaces.keys() {
            let valid = !name.is_empty()
                && name.len() < crate::room::MAX_ROOM_NAME_LEN
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !valid {
                return Err(NamespaceError::BadName {
                    path: path.to_owned(),
                    name: name.clone(),
                });
            }
        }
        Ok(Namespaces {
            default: file.default,
            named: file.namespaces,
        })
    }

    /// The namespace a room belongs to: the text before its first `:`, if any.
    pub fn namespace_of(room: &str) -> Option<&str> {
        room.split_once(':').map(|(ns, _)| ns)
    }

    /// The options that apply to `room`.
    pub fn of(&self, room: &str) -> &NamespaceOptions {
        Self::namespace_of(room)
            .and_then(|ns| self.named.get(ns))
            .unwrap_or(&self.default)
    }

    /// Whether every room gets the global defaults (no file, or one that changes nothing).
    pub fn is_trivial(&self) -> bool {
        self.named.values().all(|o| *o == self.default)
            && self.default == NamespaceOptions::default()
    }

    /// How many namespaces the file names (the default one not counted).
    pub fn len(&self) -> usize {
        self.named.len()
    }

    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Namespaces, NamespaceError> {
        Namespaces::parse(text, Path::new("ns.json"))
    }

    #[test]
    fn rooms_map_to_their_namespace() {
        let ns = parse(
            r#"{"namespaces": {"news": {"client_publish": false},
                               "lobby": {"member_events": false, "history_size": 0}}}"#,
        )
        .unwrap();
        assert!(!ns.of("news:world").client_publish);
        assert!(ns.of("news:world").presence);
        assert!(!ns.of("lobby:a:b").member_events);
        assert!(!ns.of("lobby:").keeps_history());
        // No colon, an unknown namespace, or the name only as a prefix: the default.
        for room in ["news", "newsy:x", "other:x", "lobbyx:y"] {
            assert_eq!(ns.of(room), &NamespaceOptions::default(), "{room}");
        }
        assert_eq!(Namespaces::namespace_of("a:b:c"), Some("a"));
        assert_eq!(Namespaces::namespace_of("abc"), None);
    }

    #[test]
    fn defaults_and_overrides() {
        let ns = parse(r#"{"default": {"history_ttl_seconds": 60, "presence": false}}"#).unwrap();
        let d = ns.of("room");
        assert_eq!(d.history_ttl_seconds, Some(60));
        assert_eq!(d.history_size, None);
        assert!(!d.presence);
        assert!(d.member_events);
        assert!(
            !d.announces_members(),
            "presence off silences member events"
        );
        assert!(!ns.is_trivial());
        assert!(parse("{}").unwrap().is_trivial());
        assert!(Namespaces::default().is_trivial());
        assert!(
            !parse(r#"{"namespaces": {"t": {"history_ttl_seconds": 0}}}"#)
                .unwrap()
                .of("t:x")
                .keeps_history()
        );
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let typo = parse(r#"{"namespaces": {"a": {"presense": false}}}"#).unwrap_err();
        assert!(matches!(typo, NamespaceError::Parse { .. }));
        assert!(typo.to_string().contains("presense"), "{typo}");
        assert!(matches!(
            parse(r#"{"namespaces": {"a:b": {}}}"#),
            Err(NamespaceError::BadName { .. })
        ));
        assert!(matches!(
            parse(r#"{"namespaces": {"": {}}}"#),
            Err(NamespaceError::BadName { .. })
        ));
        assert!(matches!(
            parse(r#"{"namespaces": {"a": {"history_size": -1}}}"#),
            Err(NamespaceError::Parse { .. })
        ));
        assert!(matches!(
            parse("not json"),
            Err(NamespaceError::Parse { .. })
        ));
        assert!(matches!(
            Namespaces::from_file(Path::new("/nonexistent/ns.json")),
            Err(NamespaceError::Read { .. })
        ));
    }

    #[test]
    fn the_example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/namespaces.example.json");
        let ns = Namespaces::from_file(&path).unwrap();
        assert!(!ns.is_empty());
    }
}
