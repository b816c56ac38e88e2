//! Uploaded files: where a job's file may be read from, reading it within
//! the size limit, and what becomes of it once the job has completed.
//!
//! The upload root is a trust boundary: `file_path` comes from a table row,
//! so a path that resolves outside the root (by `..` or by a symlink that
//! points out) is refused rather than read.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::{AfterSuccess, FileSettings};
use crate::queue::JobError;

/// A file read into memory, with its content hash.
pub struct SourceFile {
    pub bytes: Vec<u8>,
    /// Lower-case hex SHA-256 of `bytes`.
    pub sha256: String,
}

/// An upload's location: where it really is, and the path as named.
pub struct Upload {
    /// Symlinks and `..` resolved: what is read.
    pub real: PathBuf,
    /// As the job named it (joined to the root if relative): what is
    /// deleted or moved after success, so a symlink is disposed of rather
    /// than the file it points at.
    pub named: PathBuf,
}

/// Finds `file_path` under the upload root, following symlinks, and refuses
/// it if the real location is outside the root.
pub fn resolve(settings: &FileSettings, file_path: &str) -> Result<Upload, JobError> {
    let root = settings.upload_root.canonicalize().map_err(|e| {
        JobError::transient(format!(
            "The upload directory {} (files.upload_root) is not available: {e}.",
            settings.upload_root.display()
        ))
    })?;
    let given = Path::new(file_path);
    let joined = if given.is_absolute() {
        given.to_path_buf()
    } else {
        root.join(given)
    };
    let real = match joined.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A relative file_path: say where it was looked for.
            let looked_for = if given.is_absolute() {
                String::new()
            } else {
                format!(" (looked for {})", joined.display())
            };
            return Err(JobError::permanent(format!(
                "The uploaded file {file_path:?} does not exist{looked_for}. Upload it again."
            )));
        }
        Err(e) => {
            return Err(JobError::permanent(format!(
                "The uploaded file {file_path:?} cannot be opened: {e}."
            )))
        }
    };
    if !real.starts_with(&root) {
        return Err(JobError::permanent(format!(
            "Refused file_path {file_path:?}: it resolves outside the upload directory {} (files.upload_root).",
            settings.upload_root.display()
        )));
    }
    if !real.is_file() {
        return Err(JobError::permanent(format!(
            "file_path {file_path:?} is not a regular file."
        )));
    }
    Ok(Upload {
        real,
        named: joined,
    })
}

/// Reads the whole file, refusing it before reading if it is over the limit.
/// Blocking: call it off the async runtime.
pub fn read(path: &Path, max_bytes: u64) -> Result<SourceFile, JobError> {
    let cannot =
        |e: std::io::Error| JobError::transient(format!("Reading {} failed: {e}.", path.display()));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let size = file.metadata().map_err(cannot)?.len();
    if size > max_bytes {
        return Err(too_big(size, max_bytes));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // `take` guards against a file that grows while it is read.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_big(bytes.len() as u64, max_bytes));
    }
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok(SourceFile { bytes, sha256 })
}

fn too_big(size: u64, max: u64) -> JobError {
    JobError::permanent(format!(
        "The file is {:.1} MB, over the {} MB limit (files.max_file_mb).",
        size as f64 / 1e6,
        max / 1_000_000
    ))
}

/// What to do with a job's file once its completion is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposal {
    Delete(PathBuf),
    Move { from: PathBuf, to_dir: PathBuf },
}

impl Disposal {
    pub fn for_settings(settings: &FileSettings, path: &Path) -> Option<Disposal> {
        match settings.after_success {
            AfterSuccess::Keep => None,
            AfterSuccess::Delete => Some(Disposal::Delete(path.to_path_buf())),
            AfterSuccess::Move => Some(Disposal::Move {
                from: path.to_path_buf(),
                to_dir: settings.move_to.clone(),
            }),
        }
    }

    /// Carries it out. Blocking. A failure is logged, not raised: the job
    /// has completed, and the file is only left where it was.
    pub fn apply(&self) {
        let result = match self {
            Disposal::Delete(path) => std::fs::remove_file(path),
            Disposal::Move { from, to_dir } => move_without_clobbering(from, to_dir),
        };
        match result {
            Ok(()) => tracing::debug!(disposal = ?self, "uploaded file disposed of"),
            Err(e) => {
                tracing::warn!(disposal = ?self, error = %e, "could not dispose of the uploaded file")
            }
        }
    }
}

/// Moves `from` into `to_dir` under its own name, or `name-1.ext`,
/// `name-2.ext`, ... when that is taken: two uploads with one name (from
/// different folders, or an earlier run) must not overwrite each other.
/// `hard_link` fails if the target exists, which makes the check and the
/// move one step; then the original name is removed.
fn move_without_clobbering(from: &Path, to_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to_dir)?;
    let name = Path::new(from.file_name().unwrap_or_default());
    let stem = name.file_stem().unwrap_or_default().to_string_lossy();
    let ext = name
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    for n in 0..10_000 {
        let candidate = if n == 0 {
            to_dir.join(name)
        } else {
            to_dir.join(format!("{stem}-{n}{ext}"))
        };
        match std::fs::hard_link(from, &candidate) {
            Ok(()) => return std::fs::remove_file(from),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free name in files.move_to"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        for (folder, text) in [("a", "first"), ("b", "second"), ("c", "third")] {
            let src = dir.path().join(folder).join("report.txt");
            std::fs::create_dir_all(src.parent().unwrap()).unwrap();
            std::fs::write(&src, text).unwrap();
            move_without_clobbering(&src, &done).unwrap();
            assert!(!src.exists());
        }
        let read = |n: &str| std::fs::read_to_string(done.join(n)).unwrap();
        assert_eq!(read("report.txt"), "first");
        assert_eq!(read("report-1.txt"), "second");
        assert_eq!(read("report-2.txt"), "third");
    }
}
