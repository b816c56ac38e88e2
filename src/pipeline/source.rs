//! Uploaded files: where a job's file may be read from, reading it within
//! the size limit, and what becomes of it once the job has completed.
//!
//! The upload root is a trust boundary: `file_path` comes from a table row,
//! and whoever can write inside the root (a shared volume, the app's own
//! archive extraction) can swap a directory for a symlink at any moment. So
//! the file is opened once, beneath an open handle of the root, never by a
//! path resolved earlier: `openat2` with `RESOLVE_BENEATH` where the kernel
//! has it, and otherwise, or for a symlink it refuses (an absolute one),
//! a component-by-component walk that opens each step with `O_NOFOLLOW`
//! and resolves symlinks itself, refusing any that lead out. Then the open
//! descriptor is checked (a regular file, its size) and read; nothing is
//! opened by name again.
//!
//! Messages on the row name `file_path` as the app gave it, never the root,
//! and "outside the upload directory" does not depend on whether the target
//! exists: the row is no oracle for the paths around the root. The log has
//! the detail.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::config::{AfterSuccess, FileSettings};
use crate::queue::JobError;

/// Symlinks followed in one path at most (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// A file read into memory, with its content hash.
pub struct SourceFile {
    pub bytes: Vec<u8>,
    /// Lower-case hex SHA-256 of `bytes`.
    pub sha256: String,
}

/// An upload, opened.
pub struct Upload {
    /// The open file: what is read.
    pub file: File,
    /// As the job named it (joined to the root if relative): what is
    /// deleted or moved after success, so a symlink is disposed of rather
    /// than the file it points at.
    pub named: PathBuf,
}

/// Why a path could not be opened beneath the root.
#[derive(Debug)]
enum Refusal {
    Outside,
    Missing,
    Io(std::io::Error),
}

/// Opens `file_path` beneath the upload root. Blocking (the filesystem):
/// call it off the async runtime.
pub fn open(settings: &FileSettings, file_path: &str) -> Result<Upload, JobError> {
    let root_path = &settings.upload_root;
    let root = rustix::fs::open(
        root_path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        tracing::warn!(upload_root = %root_path.display(), error = %e, "the upload directory cannot be opened");
        JobError::transient(format!(
            "The upload directory (files.upload_root) is not available: {}.",
            std::io::Error::from(e)
        ))
    })?;
    let given = Path::new(file_path);
    let relative = if given.is_absolute() {
        beneath(root_path, given)
    } else {
        Some(given.to_path_buf())
    };
    let opened = match relative {
        None => Err(Refusal::Outside),
        Some(rel) => open_beneath(&root, root_path, &rel),
    };
    let fd = opened.map_err(|why| {
        tracing::info!(file_path, upload_root = %root_path.display(), reason = ?why, "refused or missing upload");
        match why {
            Refusal::Outside => JobError::permanent(format!(
                "Refused file_path {file_path:?}: it is outside the upload directory (files.upload_root)."
            )),
            Refusal::Missing => JobError::permanent(format!(
                "The uploaded file {file_path:?} does not exist in the upload directory. Upload it again."
            )),
            Refusal::Io(e) => JobError::permanent(format!(
                "The uploaded file {file_path:?} cannot be opened: {e}."
            )),
        }
    })?;
    let file = File::from(fd);
    let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
    if !regular {
        return Err(JobError::permanent(format!(
            "file_path {file_path:?} is not a regular file."
        )));
    }
    let named = if given.is_absolute() {
        given.to_path_buf()
    } else {
        root_path.join(given)
    };
    Ok(Upload { file, named })
}

/// `path` relative to the root, when it names something under it: by the
/// root as configured, or as it really is (the root may be a symlink).
fn beneath(root: &Path, path: &Path) -> Option<PathBuf> {
    if let Ok(rel) = path.strip_prefix(root) {
        return Some(rel.to_path_buf());
    }
    let real = root.canonicalize().ok()?;
    path.strip_prefix(real).ok().map(Path::to_path_buf)
}

fn open_beneath(root: &OwnedFd, root_path: &Path, rel: &Path) -> Result<OwnedFd, Refusal> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let rel_or_dot = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    match rustix::fs::openat2(
        root,
        rel_or_dot,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(fd),
        // No openat2 (an old kernel, a seccomp filter), or a symlink it
        // will not follow (an absolute one, which may still point inside):
        // walk it ourselves, which decides about such links.
        Err(Errno::NOSYS | Errno::PERM | Errno::XDEV) => walk(root, root_path, rel),
        Err(Errno::NOENT | Errno::NOTDIR) => Err(Refusal::Missing),
        Err(e) => Err(Refusal::Io(e.into())),
    }
}

/// Resolves `rel` one component at a time from the root's descriptor,
/// opening each with `O_NOFOLLOW` and resolving symlinks here, so that no
/// step can leave the root whatever is swapped meanwhile.
fn walk(root: &OwnedFd, root_path: &Path, rel: &Path) -> Result<OwnedFd, Refusal> {
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(Refusal::Io);
    let mut dirs: Vec<OwnedFd> = vec![dup(root)?];
    let mut todo: VecDeque<OsString> = components(rel)?;
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            if dirs.len() == 1 {
                return Err(Refusal::Outside);
            }
            dirs.pop();
            continue;
        }
        let last = todo.is_empty();
        let dir = dirs.last().expect("the root is never popped");
        let mut flags =
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::NOFOLLOW;
        if !last {
            flags |= OFlags::DIRECTORY;
        }
        match rustix::fs::openat(dir, name.as_os_str(), flags, Mode::empty()) {
            Ok(fd) if last => return Ok(fd),
            Ok(fd) => dirs.push(fd),
            Err(Errno::LOOP | Errno::NOTDIR | Errno::MLINK) => {
                // A symlink (O_NOFOLLOW refuses it), or not a directory.
                let target = match rustix::fs::readlinkat(dir, name.as_os_str(), Vec::new()) {
                    Ok(t) => PathBuf::from(std::ffi::OsStr::from_bytes(t.as_bytes())),
                    Err(_) => return Err(Refusal::Missing),
                };
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Refusal::Io(std::io::Error::other(
                        "too many symbolic links",
                    )));
                }
                let mut next = if target.is_absolute() {
                    let Some(inside) = beneath(root_path, &target) else {
                        return Err(Refusal::Outside);
                    };
                    dirs.truncate(1);
                    components(&inside)?
                } else {
                    components(&target)?
                };
                next.extend(todo.drain(..));
                todo = next;
            }
            Err(Errno::NOENT) => return Err(Refusal::Missing),
            Err(e) => return Err(Refusal::Io(e.into())),
        }
    }
    // An empty path names the root itself: a directory, refused by the caller.
    dup(dirs.last().expect("the root is never popped"))
}

/// A relative path's components; `.` dropped, `..` kept for the walk.
fn components(path: &Path) -> Result<VecDeque<OsString>, Refusal> {
    let mut out = VecDeque::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push_back(n.to_os_string()),
            Component::ParentDir => out.push_back("..".into()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::Outside),
        }
    }
    Ok(out)
}

/// Reads the whole open file, refusing it before reading if it is over the
/// limit. Blocking: call it off the async runtime.
pub fn read(file: File, max_bytes: u64) -> Result<SourceFile, JobError> {
    let cannot = |e: std::io::Error| JobError::transient(format!("Reading the file failed: {e}."));
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
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// An upload root with a file, and a secret beside it.
    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        settings: FileSettings,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("uploads");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("docs")).unwrap();
        std::fs::create_dir_all(outside.join("docs")).unwrap();
        std::fs::write(root.join("docs/a.txt"), "inside").unwrap();
        std::fs::write(outside.join("docs/a.txt"), "SECRET").unwrap();
        std::fs::write(outside.join("passwd"), "SECRET").unwrap();
        let settings = FileSettings {
            upload_root: root.clone(),
            ..crate::config::Settings::load(None).unwrap().files
        };
        Fixture {
            _dir: dir,
            root,
            outside,
            settings,
        }
    }

    fn text(f: &Fixture, file_path: &str) -> Result<String, String> {
        let upload = open(&f.settings, file_path).map_err(|e| e.message)?;
        let read = read(upload.file, 1_000_000).map_err(|e| e.message)?;
        Ok(String::from_utf8(read.bytes).unwrap())
    }

    #[test]
    fn paths_inside_the_root_open_and_symlinks_that_stay_inside_too() {
        let f = fixture();
        let abs = f.root.join("docs/a.txt");
        assert_eq!(text(&f, "docs/a.txt").as_deref(), Ok("inside"));
        assert_eq!(text(&f, abs.to_str().unwrap()).as_deref(), Ok("inside"));
        assert_eq!(text(&f, "docs/../docs/./a.txt").as_deref(), Ok("inside"));
        symlink("docs/a.txt", f.root.join("relative-link")).unwrap();
        symlink(&abs, f.root.join("absolute-link")).unwrap();
        symlink(f.root.join("docs"), f.root.join("dir-link")).unwrap();
        assert_eq!(text(&f, "relative-link").as_deref(), Ok("inside"));
        assert_eq!(text(&f, "absolute-link").as_deref(), Ok("inside"));
        assert_eq!(text(&f, "dir-link/a.txt").as_deref(), Ok("inside"));
    }

    #[test]
    fn paths_outside_the_root_get_one_answer_that_names_no_root() {
        let f = fixture();
        symlink(f.outside.join("passwd"), f.root.join("leak")).unwrap();
        symlink("../outside/docs", f.root.join("leak-dir")).unwrap();
        let outside = |p: &str| {
            let e = text(&f, p).unwrap_err();
            assert!(e.contains("outside the upload directory"), "{p}: {e}");
            assert!(!e.contains(f.root.to_str().unwrap()), "{p}: {e}");
            e
        };
        // Whether or not the target exists, the same answer.
        let exists = outside("../outside/passwd");
        let missing = outside("../outside/no-such-file");
        assert_eq!(
            exists.replace("passwd", "X"),
            missing.replace("no-such-file", "X")
        );
        outside(f.outside.join("passwd").to_str().unwrap());
        outside("/etc/passwd");
        outside("leak");
        outside("leak-dir/a.txt");
        let e = text(&f, "never-uploaded.txt").unwrap_err();
        assert!(
            e.contains("does not exist") && e.contains("never-uploaded.txt"),
            "{e}"
        );
        assert!(!e.contains(f.root.to_str().unwrap()), "{e}");
    }

    #[test]
    fn only_regular_files_are_read_and_a_fifo_does_not_block() {
        let f = fixture();
        let fifo = f.root.join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        assert!(text(&f, "pipe").unwrap_err().contains("not a regular file"));
        assert!(text(&f, "docs").unwrap_err().contains("not a regular file"));
    }

    #[test]
    fn the_walk_alone_confines_as_openat2_does() {
        let f = fixture();
        let root =
            rustix::fs::open(&f.root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        symlink("../outside/passwd", f.root.join("leak")).unwrap();
        symlink(f.root.join("docs/a.txt"), f.root.join("absolute-link")).unwrap();
        let walked = |p: &str| walk(&root, &f.root, Path::new(p));
        assert!(matches!(walked("leak"), Err(Refusal::Outside)));
        assert!(matches!(walked("../outside/passwd"), Err(Refusal::Outside)));
        assert!(matches!(walked("docs/nope"), Err(Refusal::Missing)));
        let mut s = String::new();
        File::from(walked("absolute-link").unwrap())
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "inside");
    }

    /// Someone who can write inside the root swaps a directory for a symlink
    /// to one outside, over and over, while files are opened: not one byte
    /// from outside is read.
    #[test]
    fn a_directory_swapped_for_a_symlink_never_leaks_a_byte() {
        let f = fixture();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = std::thread::spawn({
            let (root, outside, stop) = (f.root.clone(), f.outside.clone(), stop.clone());
            move || {
                let (docs, real, link) = (
                    root.join("docs"),
                    root.join("docs.real"),
                    root.join("docs.link"),
                );
                symlink(outside.join("docs"), &link).unwrap();
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // docs -> docs.real, then the symlink takes its name; and back.
                    std::fs::rename(&docs, &real).unwrap();
                    std::fs::rename(&link, &docs).unwrap();
                    std::fs::rename(&docs, &link).unwrap();
                    std::fs::rename(&real, &docs).unwrap();
                    swaps += 1;
                }
                swaps
            }
        });
        let (mut inside, mut refused) = (0, 0);
        for _ in 0..3000 {
            match text(&f, "docs/a.txt") {
                Ok(t) => {
                    assert_eq!(t, "inside", "a byte from outside the root was read");
                    inside += 1;
                }
                Err(_) => refused += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        assert!(swaps > 100, "the swap loop barely ran ({swaps})");
        eprintln!("{inside} read inside, {refused} refused, {swaps} swaps");
    }

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
