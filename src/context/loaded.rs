//! The config in force (`ConfigState`): where it came from, when it was
//! loaded, its hash (`CACHE.STATUS` `config_hash`) and how reloads ended.
//! The reload itself is `reload::reload`, above `Context`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use crate::config::{Config, Overrides};
use crate::worker::lock;

/// Where the config came from, and what is in force.
pub struct ConfigState {
    /// The file given with `--config` and the flags that override it;
    /// `None` when kiln runs on built-in defaults (nothing to re-read).
    source: Mutex<Option<(String, Overrides)>>,
    current: Mutex<Loaded>,
    /// Reloads by result: `[ok, error]`.
    pub results: [AtomicU64; 2],
}

pub struct Loaded {
    pub config: Config,
    pub at: SystemTime,
    pub hash: String,
}

/// A short hash of the config text, to tell configs apart in
/// `CACHE.STATUS` (`config_hash`): the first 16 hex digits of its SHA-256.
pub fn hash_text(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl ConfigState {
    pub fn new(config: &Config, text: &str) -> ConfigState {
        ConfigState {
            source: Mutex::new(None),
            current: Mutex::new(Loaded {
                config: config.clone(),
                at: SystemTime::now(),
                hash: hash_text(text),
            }),
            results: Default::default(),
        }
    }

    /// Names the file later reloads read (its text as loaded at start),
    /// with the flags that override it.
    pub fn set_source(&self, path: &str, text: &str, overrides: Overrides) {
        *lock(&self.source) = Some((path.to_string(), overrides));
        lock(&self.current).hash = hash_text(text);
    }

    /// `server.shutdown_grace` in force.
    pub fn shutdown_grace(&self) -> std::time::Duration {
        lock(&self.current).config.server.shutdown_grace
    }

    /// When the config in force was loaded, and its hash.
    pub fn loaded(&self) -> (SystemTime, String) {
        let c = lock(&self.current);
        (c.at, c.hash.clone())
    }

    /// The file later reloads read and the flags that override it;
    /// `None` when kiln runs on built-in defaults.
    pub fn source(&self) -> Option<(String, Overrides)> {
        lock(&self.source).clone()
    }

    /// The config in force, locked: a reload holds it from the comparison
    /// with the new file until the new one is in force.
    pub fn current(&self) -> std::sync::MutexGuard<'_, Loaded> {
        lock(&self.current)
    }
}
