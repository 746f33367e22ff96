//! A job's spill files: the buckets of a spilled PSI session ([`cleanroom_circuits::spill`]) in
//! a directory of their own under the node's spill directory, removed when the job ends (the
//! store is dropped with the session, on success, failure or cancellation).
//!
//! What is in them: blinded points (`k·H(x)`, `k_peer·H(y)` as the peer sent them,
//! `k·k_peer·H(y)`, `k_peer·k·H(x)`), never an identifier. A `match` that learns its
//! membership also keeps each point's tag (16 bytes of SHA-256 over a key drawn for the job
//! and the identifier) and the place of each returned point in our stream. Without the job's
//! keys, which never leave memory, points and tags are uniform strings.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cleanroom_circuits::spill::{PointSet, PointStore};

/// Each open bucket's write buffer. At most one set's 256 buckets are written at a time.
const WRITE_BUFFER: usize = 8 << 10;

/// `<dir>/<set>-<bucket>`.
pub(crate) fn bucket_path(dir: &Path, set: PointSet, bucket: usize) -> PathBuf {
    let set = match set {
        PointSet::Own => "own",
        PointSet::Peer => "peer",
        PointSet::Returned => "returned",
        PointSet::PeerRaw => "peer-raw",
        PointSet::PeerInOrder => "peer-in-order",
        PointSet::OwnTags => "own-tags",
        PointSet::ReturnedPlaced => "returned-placed",
        PointSet::PeerPlaced => "peer-placed",
        PointSet::ValueRows => "value-rows",
        PointSet::ValueCells => "value-cells",
    };
    dir.join(format!("{set}-{bucket:03}"))
}

/// The buckets as files in the job's own directory.
#[derive(Debug)]
pub struct FileStore {
    dir: tempfile::TempDir,
    /// Locked while the store lives, so that [`sweep`] tells a running job's directory from one
    /// a killed node left (the lock goes with the process, however it ends).
    _lock: File,
    writers: HashMap<(PointSet, usize), BufWriter<File>>,
    written: u64,
}

impl FileStore {
    /// A fresh directory under `spill_dir` (created if missing), named after the job.
    pub fn create(spill_dir: &Path, job_id: &str) -> std::io::Result<FileStore> {
        std::fs::create_dir_all(spill_dir)?;
        // Job ids come from the coordinator: keep the characters that are safe in a name.
        let name: String = job_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(64)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{JOB_DIR_PREFIX}{name}-"))
            .tempdir_in(spill_dir)?;
        let lock = File::create(dir.path().join(LOCK_FILE))?;
        lock.try_lock().map_err(std::io::Error::other)?;
        Ok(FileStore {
            dir,
            _lock: lock,
            writers: HashMap::new(),
            written: 0,
        })
    }

    /// The job's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, set: PointSet, bucket: usize) -> PathBuf {
        bucket_path(self.dir.path(), set, bucket)
    }

    /// Flushes and closes the bucket's writer, if it is open.
    fn close(&mut self, set: PointSet, bucket: usize) -> std::io::Result<()> {
        match self.writers.remove(&(set, bucket)) {
            Some(mut w) => w.flush(),
            None => Ok(()),
        }
    }
}

/// How a job's spill directory is named: `psi-<job>-<random>`.
const JOB_DIR_PREFIX: &str = "psi-";

/// The file a running job holds locked in its spill directory.
const LOCK_FILE: &str = "lock";

/// Removes the job directories under `spill_dir` that no running job holds: what a node killed
/// during a job left behind. Run at the node's start; a directory another process still holds
/// (a node sharing the spill directory) is kept. Returns how many were removed.
pub fn sweep(spill_dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(spill_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(JOB_DIR_PREFIX));
        if !ours || !entry.file_type()?.is_dir() {
            continue;
        }
        let held = match File::open(entry.path().join(LOCK_FILE)) {
            Ok(lock) => matches!(lock.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            // Killed between making the directory and its lock file.
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if !held {
            std::fs::remove_dir_all(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl PointStore for FileStore {
    fn append(&mut self, set: PointSet, bucket: usize, points: &[u8]) -> std::io::Result<()> {
        let writer = match self.writers.entry((set, bucket)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let path = bucket_path(self.dir.path(), set, bucket);
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                e.insert(BufWriter::with_capacity(WRITE_BUFFER, file))
            }
        };
        writer.write_all(points)?;
        self.written += points.len() as u64;
        Ok(())
    }

    fn read(&mut self, set: PointSet, bucket: usize) -> std::io::Result<Vec<u8>> {
        self.close(set, bucket)?;
        match std::fs::read(self.path(set, bucket)) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn read_at(
        &mut self,
        set: PointSet,
        bucket: usize,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        self.close(set, bucket)?;
        let mut file = match File::open(self.path(set, bucket)) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(offset))?;
        let mut out = Vec::with_capacity(len);
        file.take(len as u64).read_to_end(&mut out)?;
        Ok(out)
    }

    fn put(&mut self, set: PointSet, bucket: usize, points: &[u8]) -> std::io::Result<()> {
        self.close(set, bucket)?;
        std::fs::write(self.path(set, bucket), points)?;
        self.written += points.len() as u64;
        Ok(())
    }

    fn bytes_written(&self) -> u64 {
        self.written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Written through to the file system, so that another host reading a shared mount
        // sees them when it opens the files.
        self.writers.values_mut().try_for_each(|w| {
            w.flush()?;
            w.get_ref().sync_data()
        })
    }
}

/// Whether `dir` is named as a job's spill directory is (`psi-…`): the only directories an
/// executor reads buckets from.
pub(crate) fn is_job_dir(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(JOB_DIR_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A killed node's job directories (lock file free, or none) are swept; a running job's
    /// (its lock held) and anything not named like a job directory are kept.
    #[test]
    fn sweep_removes_what_a_killed_node_left_and_keeps_a_running_job() {
        let root = tempfile::tempdir().unwrap();
        let spill = root.path().join("spill");
        let running = FileStore::create(&spill, "job-running").unwrap();
        let left = spill.join("psi-job-killed-abc");
        std::fs::create_dir_all(&left).unwrap();
        std::fs::write(left.join(LOCK_FILE), "").unwrap();
        std::fs::write(left.join("own-007"), [7u8; 64]).unwrap();
        let no_lock = spill.join("psi-job-early-def");
        std::fs::create_dir_all(&no_lock).unwrap();
        let other = spill.join("datafusion-xyz");
        std::fs::create_dir_all(&other).unwrap();

        assert_eq!(sweep(&spill).unwrap(), 2);
        assert!(!left.exists() && !no_lock.exists());
        assert!(
            running.dir().is_dir(),
            "a running job's directory was swept"
        );
        assert!(other.is_dir(), "only job directories are ours to sweep");
        assert_eq!(sweep(&root.path().join("none")).unwrap(), 0);
    }

    #[test]
    fn buckets_round_trip_and_the_directory_goes_with_the_store() {
        let root = tempfile::tempdir().unwrap();
        let mut store = FileStore::create(&root.path().join("spill"), "job/../1").unwrap();
        let dir = store.dir().to_path_buf();
        assert!(dir.starts_with(root.path().join("spill")));
        assert!(
            dir.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("psi-job1-")
        );
        assert_eq!(store.read(PointSet::Peer, 3).unwrap(), Vec::<u8>::new());
        store.append(PointSet::Peer, 3, &[1; 32]).unwrap();
        store.append(PointSet::Peer, 3, &[2; 32]).unwrap();
        store.append(PointSet::Returned, 3, &[9; 32]).unwrap();
        assert_eq!(
            store.read(PointSet::Peer, 3).unwrap(),
            [[1u8; 32], [2; 32]].concat()
        );
        store.put(PointSet::Peer, 3, &[7; 32]).unwrap();
        store.append(PointSet::Peer, 3, &[8; 32]).unwrap();
        assert_eq!(
            store.read(PointSet::Peer, 3).unwrap(),
            [[7u8; 32], [8; 32]].concat()
        );
        assert_eq!(store.read(PointSet::Returned, 3).unwrap(), vec![9; 32]);
        store.append(PointSet::PeerRaw, 0, &[5; 96]).unwrap();
        assert_eq!(
            store.read_at(PointSet::PeerRaw, 0, 64, 64).unwrap(),
            vec![5; 32]
        );
        assert_eq!(
            store.read_at(PointSet::PeerRaw, 0, 96, 64).unwrap(),
            Vec::<u8>::new()
        );
        assert_eq!(
            store.read_at(PointSet::Own, 0, 0, 64).unwrap(),
            Vec::<u8>::new()
        );
        assert_eq!(store.bytes_written(), 8 * 32);
        drop(store);
        assert!(!dir.exists());
    }
}
