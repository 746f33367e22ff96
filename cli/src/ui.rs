//! Small pieces the long-running commands share: a working directory and a spinner.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A working directory: the one the user asked to keep, or a temporary one removed on drop.
#[derive(Debug)]
pub struct WorkDir {
    _temp: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl WorkDir {
    /// `keep` if given (created if missing), else a fresh temporary directory named `prefix…`.
    pub fn new(keep: Option<&Path>, prefix: &str) -> std::io::Result<Self> {
        match keep {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                Ok(Self {
                    _temp: None,
                    path: dir.to_owned(),
                })
            }
            None => {
                let temp = tempfile::Builder::new().prefix(prefix).tempdir()?;
                let path = temp.path().to_owned();
                Ok(Self {
                    _temp: Some(temp),
                    path,
                })
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A spinner on stderr with elapsed time, hidden when stderr is not a terminal (so scripts,
/// logs and `--format json` output stay clean).
pub fn spinner(message: impl Into<std::borrow::Cow<'static, str>>) -> ProgressBar {
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.set_message(message);
    progress.enable_steady_tick(Duration::from_millis(100));
    progress
}
