//! The writer: the open, append-only log of a running node (fsync per entry, head file, a file
//! lock shared with `cleanroom-node forget`, and a check of the tail before every append).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{
    AuditEntry, AuditError, AuditEvent, AuditHead, Tamper, decode_line, encode_line, head_path,
    io_err, last_line, read_head_file, split_lines, verify,
};

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) file: File,
    pub(super) head: AuditHead,
    /// Length of the file after the last complete entry.
    pub(super) len: u64,
    pub(super) poisoned: Option<String>,
    /// The file as it was after our last append (or open): if it is still so at the next
    /// append, nobody else wrote to it.
    pub(super) stamp: Option<FileStamp>,
    /// Set once the log failed its tail check: every later append fails with it.
    pub(super) tampered: Option<String>,
    /// Our last head-file write failed: the head file may lag by our last entry.
    pub(super) head_stale: bool,
}

/// What identifies a file's content cheaply: any write changes the change time (which no
/// user-level call can set back), a replacement changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    len: u64,
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
    #[cfg(unix)]
    ctime: (i64, i64),
    #[cfg(not(unix))]
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    pub(super) fn of(m: &std::fs::Metadata) -> FileStamp {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            FileStamp {
                len: m.len(),
                dev: m.dev(),
                ino: m.ino(),
                ctime: (m.ctime(), m.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
        }
    }

    /// Whether `other` is the same file (not another one put in its place).
    fn same_file(&self, other: &FileStamp) -> bool {
        #[cfg(unix)]
        {
            self.dev == other.dev && self.ino == other.ino
        }
        #[cfg(not(unix))]
        {
            let _ = other;
            true
        }
    }
}

/// The open, append-only audit log. `Send + Sync`; share it with `Arc`.
#[derive(Debug)]
pub struct AuditLog {
    pub(super) path: PathBuf,
    pub(super) head_path: PathBuf,
    pub(super) inner: Mutex<Inner>,
    pub(super) observer: std::sync::OnceLock<Observer>,
}

/// What is told of each appended event (the node's metrics): the event and its time.
pub type AppendObserver = Box<dyn Fn(&AuditEvent, i64) + Send + Sync>;

pub(super) struct Observer(AppendObserver);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl AuditLog {
    /// Opens (or creates, with its directory) the log at `path` and verifies the whole chain
    /// against its head file. A broken log is an error: the node must not start (run
    /// `cleanroom-node audit verify`). The one thing repaired is a torn last line left by a
    /// crash during an append (that append never returned, so nothing relied on it) — and only
    /// when the log is otherwise intact and agrees with its head file.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(path, "creating the directory"))?;
        }
        let head_path = head_path(path);
        let exists = path.exists();
        if !exists {
            write_head(&head_path, &AuditHead::genesis())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_err(path, "opening"))?;
        if !exists {
            sync_dir(path);
        }
        // Another process may be appending (a running node while `forget` opens the log):
        // verify and repair under the same lock `append` takes.
        file.lock().map_err(io_err(path, "locking the log"))?;
        // On error the file is dropped, which releases the lock.
        Self::open_locked(path, head_path, file)
    }

    fn open_locked(path: &Path, head_path: PathBuf, file: File) -> Result<AuditLog, AuditError> {
        let report = verify(path, None)?;
        let mut len = file
            .metadata()
            .map_err(io_err(path, "reading metadata"))?
            .len();
        if !report.is_ok() {
            let torn_only = matches!(report.problems.as_slice(), [Tamper::Incomplete { .. }]);
            if !torn_only {
                return Err(AuditError::Broken {
                    path: path.to_owned(),
                    problems: report.problems,
                });
            }
            let bytes = std::fs::read(path).map_err(io_err(path, "reading"))?;
            let keep = bytes
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p as u64 + 1);
            tracing::warn!(
                log = %path.display(),
                bytes = len - keep,
                "removing a torn last line left by an interrupted audit write"
            );
            file.set_len(keep)
                .and_then(|()| file.sync_data())
                .map_err(io_err(path, "removing a torn last line"))?;
            len = keep;
        }
        let log = AuditLog {
            path: path.to_owned(),
            head_path,
            inner: Mutex::new(Inner {
                stamp: file.metadata().ok().map(|m| FileStamp::of(&m)),
                file,
                head: report.head.clone(),
                len,
                poisoned: None,
                tampered: None,
                head_stale: false,
            }),
            observer: std::sync::OnceLock::new(),
        };
        // Bring a lagging head file up to date.
        if read_head_file(&log.head_path).ok().flatten().as_ref() != Some(&report.head) {
            write_head(&log.head_path, &report.head)?;
        }
        if let Ok(inner) = log.inner.lock() {
            let _ = inner.file.unlock();
        }
        Ok(log)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event at `now_ms`: writes the line and fsyncs it before returning, then
    /// updates the head file. Any error means the event may not be recorded: refuse the job.
    /// (If only the head-file update fails, the entry is durable but the error is still
    /// returned; `verify` accepts a head file that lags behind.)
    pub fn append(&self, event: AuditEvent, now_ms: i64) -> Result<AuditHead, AuditError> {
        event.validate()?;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.refusal(&inner)?;
        // Another process (`cleanroom-node forget`) may append to the same log: take an
        // exclusive lock for the append and catch up with what it wrote.
        inner
            .file
            .lock()
            .map_err(io_err(&self.path, "locking the log"))?;
        let observed = self.observer.get().map(|_| event.clone());
        let appended = self.append_locked(&mut inner, event, now_ms);
        let _ = inner.file.unlock();
        drop(inner);
        if let (Ok(_), Some(event), Some(observer)) = (&appended, observed, self.observer.get()) {
            (observer.0)(&event, now_ms);
        }
        appended
    }

    /// Whether appends are still accepted: an error once a write failed (the log is poisoned)
    /// or the log was found changed under this process.
    pub fn writable(&self) -> Result<(), AuditError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.refusal(&inner)
    }

    /// The error appends are refused with once a write failed or the log was found changed.
    fn refusal(&self, inner: &Inner) -> Result<(), AuditError> {
        if let Some(reason) = &inner.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.clone(),
                reason: reason.clone(),
            });
        }
        if let Some(reason) = &inner.tampered {
            return Err(AuditError::Tampered {
                path: self.path.clone(),
                reason: reason.clone(),
            });
        }
        Ok(())
    }

    /// Sets the one observer told of every event this process appends, once it is durable.
    /// Returns false (and changes nothing) if one is already set.
    pub fn observe(&self, observer: AppendObserver) -> bool {
        self.observer.set(Observer(observer)).is_ok()
    }

    /// Follows entries another process appended since we last wrote (the lock is held).
    fn catch_up(&self, inner: &mut Inner) -> Result<(), AuditError> {
        let disk_len = inner
            .file
            .metadata()
            .map_err(io_err(&self.path, "reading metadata"))?
            .len();
        if disk_len == inner.len {
            return Ok(());
        }
        let broken = |why: &str| {
            AuditError::Invalid(format!(
                "{} changed under this process ({why}); run `cleanroom-node audit verify`",
                self.path.display()
            ))
        };
        if disk_len < inner.len {
            return Err(broken("it was truncated"));
        }
        // Only what was appended since our last entry is read; each new entry must follow the
        // one before it, starting from ours.
        let mut added = Vec::new();
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut reader = File::open(&self.path).map_err(io_err(&self.path, "opening"))?;
            reader
                .seek(SeekFrom::Start(inner.len))
                .and_then(|_| reader.take(disk_len - inner.len).read_to_end(&mut added))
                .map_err(io_err(&self.path, "reading"))?;
        }
        let (lines, torn) = split_lines(&added);
        if torn.is_some() {
            return Err(broken("it ends mid-line"));
        }
        let mut head = inner.head.clone();
        for line in lines {
            let entry =
                decode_line(line).ok_or_else(|| broken("an appended line does not parse"))?;
            if entry.compute_hash() != entry.hash
                || entry.seq != head.seq + 1
                || entry.prev != head.hash
            {
                return Err(broken("an appended entry does not follow ours"));
            }
            head = AuditHead {
                seq: entry.seq,
                hash: entry.hash,
            };
        }
        inner.head = head;
        inner.len = disk_len;
        Ok(())
    }

    /// Checks, before an append, that the log still ends with our last entry: the file under
    /// the log's name is the one we write, its last line is our head entry (content and hash),
    /// and the head file says the same. Cheap (one line and the head file are read); if the
    /// file was written by anything since our last append (its change time moved, which a
    /// `forget` append also does), the whole chain is verified as well.
    fn verify_tail(&self, inner: &mut Inner) -> Result<(), String> {
        let ours = inner
            .file
            .metadata()
            .map_err(|e| format!("cannot read its metadata: {e}"))?;
        let ours = FileStamp::of(&ours);
        let named = std::fs::metadata(&self.path)
            .map_err(|e| format!("the log file cannot be read under its name: {e}"))?;
        if !FileStamp::of(&named).same_file(&ours) {
            return Err("another file was put in place of the log".into());
        }
        if ours.len != inner.len {
            return Err(format!(
                "it is {} bytes long, but ends at byte {} after its last entry",
                ours.len, inner.len
            ));
        }
        let last = last_line(&self.path, inner.len).map_err(|e| format!("reading it: {e}"))?;
        match last {
            None if inner.head == AuditHead::genesis() => {}
            None => {
                return Err(format!(
                    "it is empty, but its head is seq {}",
                    inner.head.seq
                ));
            }
            Some(line) => {
                let entry = decode_line(&line).ok_or_else(|| {
                    format!(
                        "its last line (seq {}) is not a valid entry any more",
                        inner.head.seq
                    )
                })?;
                if entry.seq != inner.head.seq
                    || entry.hash != inner.head.hash
                    || entry.compute_hash() != entry.hash
                {
                    return Err(format!(
                        "its last entry (seq {}) was changed",
                        inner.head.seq
                    ));
                }
            }
        }
        match read_head_file(&self.head_path) {
            Ok(Some(h)) if h == inner.head => {}
            // Rewritten with the next entry.
            _ if inner.head_stale => {}
            Ok(Some(h)) => {
                return Err(format!(
                    "the head file says {h}, but the log's last entry is {}",
                    inner.head
                ));
            }
            Ok(None) => return Err("the head file is missing".into()),
            Err(e) => return Err(format!("the head file is unreadable: {e}")),
        }
        if inner.stamp != Some(ours) {
            let report = verify(&self.path, None).map_err(|e| e.to_string())?;
            if let Some(first) = report.problems.first() {
                return Err(first.to_string());
            }
        }
        Ok(())
    }

    fn append_locked(
        &self,
        inner: &mut Inner,
        event: AuditEvent,
        now_ms: i64,
    ) -> Result<AuditHead, AuditError> {
        self.catch_up(inner)
            .map_err(|e| self.tampered(inner, e.to_string()))?;
        if let Err(reason) = self.verify_tail(inner) {
            return Err(self.tampered(inner, reason));
        }
        let mut entry = AuditEntry {
            seq: inner.head.seq + 1,
            at_ms: now_ms,
            prev: inner.head.hash,
            event,
            hash: [0; 32],
        };
        entry.hash = entry.compute_hash();
        let line = encode_line(&entry);
        let written = inner
            .file
            .write_all(&line)
            .and_then(|()| inner.file.sync_data());
        if let Err(source) = written {
            // Undo a partial line so the next append does not follow garbage.
            let len = inner.len;
            let undone = inner
                .file
                .set_len(len)
                .and_then(|()| inner.file.sync_data());
            if let Err(e) = undone {
                inner.poisoned = Some(format!(
                    "writing failed ({source}) and the partial line could not be removed ({e})"
                ));
            }
            return Err(AuditError::Io {
                path: self.path.clone(),
                what: "appending an entry",
                source,
            });
        }
        inner.len += line.len() as u64;
        let head = AuditHead {
            seq: entry.seq,
            hash: entry.hash,
        };
        inner.head = head.clone();
        inner.stamp = inner.file.metadata().ok().map(|m| FileStamp::of(&m));
        inner.head_stale = true;
        write_head(&self.head_path, &head)?;
        inner.head_stale = false;
        Ok(head)
    }

    /// Records that the log failed its check: this and every later append fail with `reason`.
    fn tampered(&self, inner: &mut Inner, reason: String) -> AuditError {
        tracing::error!(log = %self.path.display(), %reason, "the audit log does not verify; refusing every job");
        inner.tampered = Some(reason.clone());
        AuditError::Tampered {
            path: self.path.clone(),
            reason,
        }
    }

    /// The current head.
    pub fn head(&self) -> AuditHead {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .head
            .clone()
    }
}

fn write_head(head_path: &Path, head: &AuditHead) -> Result<(), AuditError> {
    let mut tmp_name = head_path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(format!("{head}\n").as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, head_path)
    })();
    res.map_err(io_err(head_path, "writing the head file"))?;
    sync_dir(head_path);
    Ok(())
}

/// Best effort: makes a rename or creation in the file's directory durable.
pub(crate) fn sync_dir(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = path;
}
