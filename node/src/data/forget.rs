//! Subject deletion ("forget me"): `cleanroom-node forget --dataset D --key email=…`.
//!
//! A forgotten subject is stored as a keyed hash of one normalised identifier value,
//! [`forget_hash`]`(secret, normalised)`, never as the value itself. Every later job excludes
//! a row if *any* of its dataset's declared identifiers normalises to a forgotten value
//! ([`crate::data::dataset::RowFilter::forgotten`]).
//!
//! Files, both in the node's `state_dir`:
//! - `forget.key`: the node-local HMAC key, 32 bytes from the operating system's CSPRNG,
//!   created on first use with mode 0600. It is never printed or logged. Without it the
//!   hashes cannot be tested against candidate identifiers, so the deletion list alone does
//!   not reveal who asked to be forgotten; with it, they can (by guessing values) — keep it as
//!   private as the data. Losing it makes the list useless (every recorded subject comes back):
//!   back it up with the state directory.
//! - `forgotten.jsonl`: one line per request, `{"dataset":"customers","hash":"<64 hex>"}`,
//!   appended under an exclusive file lock and fsynced before [`ForgetStore::record`] returns.
//!
//! **Running node.** The node reads `forgotten.jsonl` afresh for every job
//! ([`ForgetStore::load`]), so a deletion recorded while the node runs applies to every job
//! that loads data after the command returned. The CLI also appends an
//! [`AuditEvent::Forget`](crate::audit::AuditEvent::Forget) entry to the audit log: it opens
//! the log only for the duration of the command, holding an exclusive `flock` on the log file
//! meanwhile; a running node must take the same lock and re-read the log's head before each
//! of its own appends (otherwise two writers could both append the same sequence number). Run
//! `forget` while the node is stopped if in doubt.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dataset::{Forgotten, KEY_PART_SEPARATOR, MAX_FIELD_BYTES, forget_hash};
use super::normalise::NormaliseError;
use super::schema::DatasetConfig;
use crate::audit::{hash_from_hex, sync_dir, to_hex};

/// The key file's name in `state_dir`.
pub const KEY_FILE: &str = "forget.key";
/// The deletion list's name in `state_dir`.
pub const LIST_FILE: &str = "forgotten.jsonl";

/// Why a deletion could not be recorded or the list could not be read. Never carries an
/// identifier value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForgetError {
    /// A file could not be read or written.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file exists but is not 32 bytes, or others may read it.
    #[error("{}: {problem}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A line of the deletion list is not a valid entry.
    #[error("{}: line {line} is not a deletion entry (expected {{\"dataset\":…,\"hash\":<64 hex>}})", path.display())]
    BadEntry {
        /// The list file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
    },
    /// The dataset does not declare the identifier.
    #[error("dataset '{dataset}' declares no identifier '{identifier}' (declared: {declared})")]
    UnknownIdentifier {
        /// The dataset.
        dataset: String,
        /// The identifier asked for.
        identifier: String,
        /// The declared identifiers.
        declared: String,
    },
    /// The value is not a valid identifier of that kind (the value itself is not repeated).
    #[error("the value given for '{identifier}' of dataset '{dataset}' does not normalise: {why}")]
    Normalise {
        /// The dataset.
        dataset: String,
        /// The identifier.
        identifier: String,
        /// Why (no value in it).
        why: String,
    },
}

/// One line of `forgotten.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    dataset: String,
    hash: String,
}

/// The node's deletion list and its key.
pub struct ForgetStore {
    dir: PathBuf,
    secret: [u8; 32],
}

impl std::fmt::Debug for ForgetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgetStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ForgetError {
    let path = path.to_owned();
    move |source| ForgetError::Io { path, what, source }
}

impl ForgetStore {
    /// Opens the store in `state_dir` (created if missing), reading `forget.key` or creating it
    /// (32 random bytes from the OS, mode 0600) on first use.
    pub fn open(state_dir: impl AsRef<Path>) -> Result<ForgetStore, ForgetError> {
        let dir = state_dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir, "creating the state directory"))?;
        let path = dir.join(KEY_FILE);
        let secret = match read_key(&path)? {
            Some(k) => k,
            None => create_key(&path)?,
        };
        Ok(ForgetStore { dir, secret })
    }

    /// The deletion list's path.
    pub fn list_path(&self) -> PathBuf {
        self.dir.join(LIST_FILE)
    }

    /// Records that the subject whose `identifier` (of `dataset`) is `raw_value` is forgotten:
    /// normalises the value as the dataset does (same normaliser and options), appends
    /// `forget_hash(secret, normalised)` with the dataset's name to the list and fsyncs it.
    /// Returns the hash. The raw value is written nowhere.
    pub fn record(
        &self,
        dataset: &DatasetConfig,
        identifier: &str,
        raw_value: &str,
    ) -> Result<[u8; 32], ForgetError> {
        let hash = self.hash_of(dataset, identifier, raw_value)?;
        let entry = Entry {
            dataset: dataset.name.clone(),
            hash: to_hex(&hash),
        };
        let mut line = serde_json::to_vec(&entry).unwrap_or_default();
        line.push(b'\n');
        self.append(&line)?;
        Ok(hash)
    }

    /// How many rows of `dataset` the subject whose `identifier` is `raw_value` has today: the
    /// rows a job would exclude if the subject were forgotten in it (the same test as a job's
    /// [`RowFilter`](crate::data::dataset::RowFilter): any identifier of the row normalises to the
    /// value). Reads the whole file; records nothing.
    pub fn matching_rows(
        &self,
        dataset: &DatasetConfig,
        identifier: &str,
        raw_value: &str,
    ) -> Result<u64, String> {
        let hash = self
            .hash_of(dataset, identifier, raw_value)
            .map_err(|e| e.to_string())?;
        let forgotten = Forgotten {
            secret: self.secret,
            hashes: std::iter::once(hash).collect(),
        };
        let filter = crate::data::dataset::RowFilter {
            consent_column: None,
            forgotten: Some(&forgotten),
        };
        crate::data::dataset::for_each_row_for(dataset, &[], filter, u64::MAX, |_, _| Ok(()))
            .map(|counts| counts.rows_excluded_deleted)
            .map_err(|e| e.to_string())
    }

    /// `forget_hash(secret, normalised)` of the value, normalised as the dataset's identifier
    /// column is.
    fn hash_of(
        &self,
        dataset: &DatasetConfig,
        identifier: &str,
        raw_value: &str,
    ) -> Result<[u8; 32], ForgetError> {
        let id = dataset
            .identifier(identifier)
            .ok_or_else(|| ForgetError::UnknownIdentifier {
                dataset: dataset.name.clone(),
                identifier: identifier.to_owned(),
                declared: dataset.identifier_names(),
            })?;
        let refuse = |why: String| ForgetError::Normalise {
            dataset: dataset.name.clone(),
            identifier: identifier.to_owned(),
            why,
        };
        // The same gates as a dataset field (so a value that could never match is refused).
        if raw_value.len() > MAX_FIELD_BYTES {
            return Err(refuse(format!("longer than {MAX_FIELD_BYTES} bytes")));
        }
        if raw_value.as_bytes().contains(&KEY_PART_SEPARATOR) {
            return Err(refuse("contains the key separator byte 0x1F".into()));
        }
        let normalised = id
            .normaliser
            .normalise_with(raw_value, &id.options())
            .map_err(|e: NormaliseError| refuse(e.to_string()))?;
        Ok(forget_hash(&self.secret, normalised.as_bytes()))
    }

    fn append(&self, line: &[u8]) -> Result<(), ForgetError> {
        let path = self.list_path();
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path, "opening"))?;
        file.lock().map_err(io_err(&path, "locking"))?;
        // A torn last line (a crash mid-append, which never returned) is removed first, so it
        // neither swallows this entry nor becomes a bad line.
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_err(&path, "reading"))?;
        if bytes.last().is_some_and(|b| *b != b'\n') {
            let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
            file.set_len(keep as u64)
                .map_err(io_err(&path, "removing a torn last line"))?;
        }
        file.write_all(line)
            .and_then(|()| file.sync_data())
            .map_err(io_err(&path, "appending"))?;
        if !existed {
            sync_dir(&path);
        }
        // Unlocked when `file` closes.
        Ok(())
    }

    /// The forgotten subjects of `dataset`, with the key, for a job's
    /// [`RowFilter`](crate::data::dataset::RowFilter). A missing list is an empty one; a torn last
    /// line (an append that never returned) is ignored; any other bad line is an error (the
    /// job must not run without its deletions).
    pub fn load(&self, dataset: &str) -> Result<Forgotten, ForgetError> {
        let path = self.list_path();
        let mut hashes = std::collections::HashSet::new();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&path, "reading")(e)),
        };
        let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        // The piece after the last newline: empty, or a torn line.
        lines.pop();
        for (i, l) in lines.iter().enumerate() {
            if l.is_empty() {
                continue;
            }
            let bad = || ForgetError::BadEntry {
                path: path.clone(),
                line: i + 1,
            };
            let entry: Entry = serde_json::from_slice(l).map_err(|_| bad())?;
            let hash = hash_from_hex(&entry.hash).ok_or_else(bad)?;
            if entry.dataset == dataset {
                hashes.insert(hash);
            }
        }
        Ok(Forgotten {
            secret: self.secret,
            hashes,
        })
    }
}

fn read_key(path: &Path) -> Result<Option<[u8; 32]>, ForgetError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "opening the key file")(e)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file
            .metadata()
            .map_err(io_err(path, "reading metadata"))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(ForgetError::BadKey {
                path: path.to_owned(),
                problem: format!(
                    "the forget key is readable by others (mode {:o}); run `chmod 600 {}`",
                    mode & 0o777,
                    path.display()
                ),
            });
        }
    }
    let mut bytes = Vec::with_capacity(33);
    Read::by_ref(&mut file)
        .take(33)
        .read_to_end(&mut bytes)
        .map_err(io_err(path, "reading the key file"))?;
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| ForgetError::BadKey {
            path: path.to_owned(),
            problem: format!(
                "the forget key must be exactly 32 bytes, found {}{}",
                bytes.len().min(32),
                if bytes.len() > 32 { "+" } else { "" }
            ),
        })?;
    Ok(Some(key))
}

fn create_key(path: &Path) -> Result<[u8; 32], ForgetError> {
    use rand::TryRng;
    let mut key = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut key)
        .map_err(|e| ForgetError::BadKey {
            path: path.to_owned(),
            problem: format!("the operating system gave no randomness for a new key: {e}"),
        })?;
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    // Written to a temporary name and linked into place, so a reader never sees a short key.
    // Unique per process and per call: jobs on several threads may race to create the key.
    static ATTEMPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let attempt = ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("key.tmp{}-{attempt}", std::process::id()));
    let written = (|| {
        let mut f = options.open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            sync_dir(path);
            Ok(key)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key(path)?.ok_or_else(|| ForgetError::BadKey {
                path: path.to_owned(),
                problem: "the key file vanished while it was being created".into(),
            })
        }
        Err(e) => Err(io_err(path, "creating the key file")(e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::data::IdentifierConfig;
    use crate::data::dataset::{KeySpec, RowFilter, load_keys_for};
    use crate::data::normalise::Normaliser;

    fn dataset(dir: &Path) -> DatasetConfig {
        let path = dir.join("d.csv");
        std::fs::write(
            &path,
            "email,phone\n Alice@Example.com ,+1 202 555 0101\nbob@example.com,+1 202 555 0102\ncarol@example.com,+1 202 555 0103\n",
        )
        .unwrap();
        let id = |name: &str, normaliser| IdentifierConfig::new(name, name, normaliser);
        DatasetConfig::new(
            "customers",
            path,
            vec![
                id("email", Normaliser::Email),
                id("phone", Normaliser::Phone),
            ],
        )
    }

    #[test]
    fn key_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = ForgetStore::open(&state).unwrap();
        let key = std::fs::read(state.join(KEY_FILE)).unwrap();
        assert_eq!(key.len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(state.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let b = ForgetStore::open(&state).unwrap();
        assert_eq!(a.secret, b.secret);
        assert!(!format!("{a:?}").contains(&to_hex(&a.secret)));
        // A different node gets a different key.
        let other = ForgetStore::open(dir.path().join("other")).unwrap();
        assert_ne!(a.secret, other.secret);
    }

    #[test]
    fn bad_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), [1u8; 31]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let chmod = |mode| {
                let mode = std::fs::Permissions::from_mode(mode);
                std::fs::set_permissions(dir.path().join(KEY_FILE), mode).unwrap();
            };
            chmod(0o600);
            let msg = ForgetStore::open(dir.path()).unwrap_err().to_string();
            assert!(msg.contains("exactly 32 bytes"), "{msg}");
            std::fs::write(dir.path().join(KEY_FILE), [1u8; 32]).unwrap();
            chmod(0o644);
            let msg = ForgetStore::open(dir.path()).unwrap_err().to_string();
            assert!(msg.contains("chmod 600"), "{msg}");
        }
    }

    #[test]
    fn record_normalises_and_never_writes_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path());
        let store = ForgetStore::open(dir.path().join("state")).unwrap();
        let h = store.record(&d, "email", "  ALICE@example.COM").unwrap();
        assert_eq!(h, forget_hash(&store.secret, b"alice@example.com"));
        let text = std::fs::read_to_string(store.list_path()).unwrap();
        assert!(!text.to_lowercase().contains("alice"), "{text}");
        assert_eq!(
            text,
            format!(
                "{{\"dataset\":\"customers\",\"hash\":\"{}\"}}\n",
                to_hex(&h)
            )
        );
        let fg = store.load("customers").unwrap();
        assert!(fg.hashes.contains(&h));
        assert!(store.load("orders").unwrap().hashes.is_empty());
    }

    #[test]
    fn refusals_name_the_problem_not_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path());
        let store = ForgetStore::open(dir.path().join("state")).unwrap();
        let msg = store.record(&d, "ssn", "123").unwrap_err().to_string();
        assert!(
            msg.contains("no identifier 'ssn'") && msg.contains("email, phone"),
            "{msg}"
        );
        let msg = store
            .record(&d, "email", "not-an-email")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("does not normalise"), "{msg}");
        assert!(!msg.contains("not-an-email"), "{msg}");
        let msg = store
            .record(&d, "phone", "call me")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("'phone'"), "{msg}");
        assert!(!store.list_path().exists());
    }

    #[test]
    fn forgotten_rows_are_excluded_by_any_identifier() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path());
        let store = ForgetStore::open(dir.path().join("state")).unwrap();
        store.record(&d, "email", "alice@example.com").unwrap();
        // Bob by phone, written differently from the file.
        store.record(&d, "phone", "(202) 555-0102").unwrap();
        let fg = store.load("customers").unwrap();
        let filter = RowFilter {
            consent_column: None,
            forgotten: Some(&fg),
        };
        let loaded = load_keys_for(&d, &KeySpec::new(["email"]), filter, 100).unwrap();
        assert_eq!(loaded.rows_read, 3);
        assert_eq!(loaded.rows_excluded_deleted, 2);
        assert_eq!(loaded.items.len(), 1);
    }

    #[test]
    fn torn_last_line_is_ignored_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path());
        let store = ForgetStore::open(dir.path().join("state")).unwrap();
        let h1 = store.record(&d, "email", "alice@example.com").unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(store.list_path())
            .unwrap();
        f.write_all(b"{\"dataset\":\"customers\",\"ha").unwrap();
        drop(f);
        assert_eq!(store.load("customers").unwrap().hashes.len(), 1);
        let h2 = store.record(&d, "email", "bob@example.com").unwrap();
        let text = std::fs::read_to_string(store.list_path()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let fg = store.load("customers").unwrap();
        assert!(fg.hashes.contains(&h1) && fg.hashes.contains(&h2));
    }
}

#[cfg(test)]
mod race_tests {
    use super::*;

    /// Jobs start concurrently on one node; each opens the store, and the first use creates the
    /// key. They must all end up with the same key and no error.
    #[test]
    fn concurrent_first_opens_agree_on_one_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ForgetStore::open(&state).map(|f| f.secret)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread").expect("open"))
                .collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
    }
}
