//! Crash-safe file operations (STYLE.md rule 7): temp file in the same directory, write,
//! fsync, rename, fsync the directory. A power cut leaves either the old file or the new one,
//! never half of one. The one implementation, used by the agent (state files, installs,
//! downloads) and the controller (state files, artifacts, key files) alike.
//!
//! Errors are [`FsError`]: the step that failed and the path it failed on (never a temp name);
//! each daemon maps it into its own error type with `From`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How [`write_atomic_with`] creates and publishes a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits the file is born with (the umask still applies); `None` is `0o666`
    /// minus the umask, as for [`File::create`].
    pub mode: Option<u32>,
    /// Replace an existing file; when `false` an existing target is left alone and the write
    /// fails with [`FsError::Exists`], decided atomically by the filesystem.
    pub overwrite: bool,
}

impl Default for WriteOptions {
    fn default() -> WriteOptions {
        WriteOptions {
            mode: None,
            overwrite: true,
        }
    }
}

/// Why a file operation failed. `path` is the file asked for (or, for the directory fsync,
/// its directory), never a temp name, which no longer exists when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The target exists and [`WriteOptions::overwrite`] is `false`.
    #[error("{} already exists; not overwritten", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The operating system refused a step.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The step: `create`, `write`, `fsync`, `rename`, `link`, `fsync dir`, `remove`, …
        op: &'static str,
        /// The target file, or its directory for `fsync dir`.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// The stable `snake_case` reason code.
    pub fn code(&self) -> &'static str {
        match self {
            FsError::Exists { .. } => "file_exists",
            FsError::Io { .. } => "io_error",
        }
    }

    /// An [`FsError::Io`] for step `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> FsError {
        FsError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    fn on<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
        move |source| FsError::io(op, path, source)
    }
}

/// Result alias for this module.
pub type Result<T, E = FsError> = std::result::Result<T, E>;

/// Write `bytes` to `path` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, bytes, &WriteOptions::default())
}

/// Write `bytes` to `path` crash-safely: a temp file with a unique name in the same directory,
/// created with `opts.mode` from birth (no window where a private key is readable by others),
/// written and fsync'd, then renamed over `path` (or, without `opts.overwrite`, hard-linked,
/// which fails atomically if `path` exists), then the directory fsync'd. A crash leaves the
/// old file or the new one, never a torn one; on any error the temp name is removed.
pub fn write_atomic_with(path: &Path, bytes: &[u8], opts: &WriteOptions) -> Result<()> {
    replace_atomic(path, opts, |f| f.write_all(bytes).map_err(|e| ("write", e)))
}

/// Copy `from` to `to` the same crash-safe way, keeping `from`'s permission bits exactly
/// (as `fs::copy` does: an installed executable stays executable whatever the umask).
pub fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let mut src = File::open(from).map_err(FsError::on("open", from))?;
    let perms = src
        .metadata()
        .map_err(FsError::on("stat", from))?
        .permissions();
    let opts = WriteOptions {
        // Born with at most these bits (umask applied), then set exactly.
        mode: Some(perms.mode() & 0o7777),
        overwrite: true,
    };
    replace_atomic(to, &opts, |f| {
        io::copy(&mut src, f).map_err(|e| ("copy", e))?;
        f.set_permissions(perms).map_err(|e| ("chmod", e))
    })
}

/// The one implementation: temp file, `fill`, fsync, publish, fsync the directory, and the
/// temp name removed on every error.
fn replace_atomic(
    path: &Path,
    opts: &WriteOptions,
    fill: impl FnOnce(&mut File) -> std::result::Result<(), (&'static str, io::Error)>,
) -> Result<()> {
    let (tmp, mut file) = create_temp(path, opts.mode)?;
    let filled = fill(&mut file)
        .and_then(|()| file.sync_all().map_err(|e| ("fsync", e)))
        .map_err(|(op, e)| FsError::on(op, path)(e));
    drop(file);
    let published = filled.and_then(|()| publish(&tmp, path, opts.overwrite));
    // A rename consumed the temp name; in every other case (a link, or any failure) it is
    // still there and must not linger.
    if !(published.is_ok() && opts.overwrite) {
        let removed = fs::remove_file(&tmp);
        if published.is_ok() {
            removed.map_err(FsError::on("remove temp", &tmp))?;
        }
    }
    published?;
    let dir = parent_dir(path);
    fsync_dir(dir).map_err(FsError::on("fsync dir", dir))
}

/// Create the temp file next to `path` with `create_new`, so it is never someone else's file
/// and never a stale one; on a name collision (a leftover of a crash) the next name is tried.
fn create_temp(path: &Path, mode: Option<u32>) -> Result<(PathBuf, File)> {
    if path.file_name().is_none() {
        return Err(FsError::on("create", path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        )));
    }
    sweep_stale_temps(path);
    let mut last = None;
    for _ in 0..16 {
        let tmp = temp_sibling(path);
        let mut o = OpenOptions::new();
        o.write(true).create_new(true);
        if let Some(m) = mode {
            o.mode(m);
        }
        match o.open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(FsError::on("create", path)(e)),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists));
    Err(FsError::on("create", path)(e))
}

/// Remove temp files a crashed writer of `path` left behind (`.{name}.tmp-{pid}-{n}` whose
/// process is gone). A power cut mid-copy of a large `file` install would otherwise leave
/// the partial copy on disk, and every crash and retry another one. Temps of live processes,
/// this one included, are never touched: they may be mid-write. Best effort: a temp that
/// cannot be removed is left for the next write.
fn sweep_stale_temps(path: &Path) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent_dir(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !process_alive(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether a process with this pid exists (signal 0 probes without sending anything).
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission; it has no effect.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn publish(tmp: &Path, path: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        return fs::rename(tmp, path).map_err(FsError::on("rename", path));
    }
    // link(2) refuses an existing target atomically, unlike a check followed by a rename.
    fs::hard_link(tmp, path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            FsError::Exists {
                path: path.to_owned(),
            }
        } else {
            FsError::on("link", path)(e)
        }
    })
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary name next to `path` (same directory, so the rename is atomic), unique within
/// this process and, through the pid, among processes.
pub fn temp_sibling(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// fsync a directory, so a rename inside it survives a power cut (plain `io::Result`, for
/// callers that name the directory in their own error).
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsync a directory, so a rename inside it survives a power cut.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fsync_dir(dir).map_err(|e| FsError::io("fsync dir", dir, e))
}

/// fsync the directory holding `path`.
pub fn sync_parent(path: &Path) -> Result<()> {
    sync_dir(parent_dir(path))
}

/// Create a directory and its parents.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| FsError::io("create dir", dir, e))
}

/// Atomically point the symlink `link` at `target` (new link under a temp name, then rename).
pub fn switch_symlink(link: &Path, target: &Path) -> Result<()> {
    let tmp = temp_sibling(link);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| FsError::io("symlink", &tmp, e))?;
    fs::rename(&tmp, link).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        FsError::io("rename", link, e)
    })?;
    sync_parent(link)
}

/// Remove a file if it exists.
pub fn remove_file_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::io("remove", path, e)),
    }
}

/// Remove a directory tree if it exists.
pub fn remove_dir_if_exists(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::io("remove dir", path, e)),
    }
}

/// Remove every entry of `dir` whose name starts with `prefix` (directory trees and files),
/// then fsync `dir` so the removals survive a power cut. A missing `dir` holds nothing.
/// Returns how many entries were removed.
pub fn remove_entries_with_prefix(dir: &Path, prefix: &str) -> Result<usize> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(FsError::io("read dir", dir, e)),
    };
    let mut removed = 0;
    for entry in rd {
        let entry = entry.map_err(|e| FsError::io("read dir", dir, e))?;
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = entry.path();
        // `file_type` does not follow symlinks: a link is removed, never what it points at.
        let is_dir = entry
            .file_type()
            .map_err(|e| FsError::io("stat", &path, e))?
            .is_dir();
        if is_dir {
            remove_dir_if_exists(&path)?;
        } else {
            remove_file_if_exists(&path)?;
        }
        removed += 1;
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temps_of_dead_writers_are_swept_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("app.bin");
        // A pid that certainly belongs to no process: a child that has been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = d.path().join(format!(".app.bin.tmp-{dead}-3"));
        let ours = d
            .path()
            .join(format!(".app.bin.tmp-{}-999", std::process::id()));
        let other_file = d.path().join(format!(".other.bin.tmp-{dead}-0"));
        for f in [&stale, &ours, &other_file] {
            fs::write(f, b"partial").unwrap();
        }
        write_atomic(&p, b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert!(!stale.exists(), "a dead writer's temp is removed");
        assert!(ours.exists(), "this process's temps may be mid-write");
        assert!(other_file.exists(), "only temps of the file being written");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn file_gets_the_requested_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.key");
        let private = WriteOptions {
            mode: Some(0o600),
            overwrite: false,
        };
        write_atomic_with(&p, b"secret", &private).unwrap();
        assert_eq!(mode_of(&p), 0o600);
        // Replacing takes the new file's mode, not the old one's.
        let public = WriteOptions {
            mode: Some(0o644),
            overwrite: true,
        };
        write_atomic_with(&p, b"public", &public).unwrap();
        assert_eq!(mode_of(&p) & 0o600, 0o600);
        assert_eq!(mode_of(&p) & 0o133, 0, "never wider than asked");
        assert_eq!(names(d.path()), vec!["k.key"]);
    }

    #[test]
    fn refused_overwrite_keeps_the_old_file_and_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.key");
        let refuse = WriteOptions {
            mode: Some(0o600),
            overwrite: false,
        };
        write_atomic_with(&p, b"first", &refuse).unwrap();
        let err = write_atomic_with(&p, b"second", &refuse).unwrap_err();
        assert_eq!(err.code(), "file_exists");
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(names(d.path()), vec!["k.key"]);
    }

    #[test]
    fn failed_rename_names_the_target_and_removes_the_temp() {
        let d = tempfile::tempdir().unwrap();
        // A non-empty directory where the file should go: rename(2) must fail.
        let p = d.path().join("busy");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("inside"), b"x").unwrap();
        let err = write_atomic_with(&p, b"data", &WriteOptions::default()).unwrap_err();
        match &err {
            FsError::Io { op, path, .. } => {
                assert_eq!(*op, "rename");
                assert_eq!(path, &p);
            }
            other => panic!("expected an io error, got {other:?}"),
        }
        assert_eq!(names(d.path()), vec!["busy"]);
        assert_eq!(err.code(), "io_error");
        assert!(err.to_string().starts_with("rename "), "{err}");
    }

    #[test]
    fn missing_directory_fails_naming_the_target() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("no-such-dir").join("state.json");
        let err = write_atomic(&p, b"x").unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
        assert!(names(d.path()).is_empty());
    }

    #[test]
    fn concurrent_writers_of_one_file_never_collide_on_the_temp_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("status.json");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..25 {
                        write_atomic(p, &[t; 64]).unwrap();
                    }
                });
            }
        });
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len(), 64);
        assert!(
            got.iter().all(|b| *b == got[0]),
            "one writer's bytes, whole"
        );
        assert_eq!(names(d.path()), vec!["status.json"]);
    }

    #[test]
    fn copy_keeps_the_source_mode_exactly_and_replaces_the_target() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (from, to) = (d.path().join("app.bin"), d.path().join("installed"));
        fs::write(&from, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&from, fs::Permissions::from_mode(0o775)).unwrap();
        fs::write(&to, b"old").unwrap();
        copy_atomic(&from, &to).unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"#!/bin/sh\n");
        // 0o775 survives even a umask that would strip group write.
        assert_eq!(mode_of(&to), 0o775);
        assert_eq!(names(d.path()), vec!["app.bin", "installed"]);
        let err = copy_atomic(&d.path().join("missing"), &to).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert_eq!(fs::read(&to).unwrap(), b"#!/bin/sh\n");
    }

    #[test]
    fn temp_names_are_unique_and_hidden() {
        let p = Path::new("/data/state.json");
        let (a, b) = (temp_sibling(p), temp_sibling(p));
        assert_ne!(a, b);
        assert_eq!(a.parent(), p.parent());
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".state.json.tmp-"));
    }

    #[test]
    fn entries_with_a_prefix_are_removed_and_others_kept() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join(".staging-1.2.0/sub")).unwrap();
        fs::write(d.path().join(".staging-1.2.0/sub/f"), b"half").unwrap();
        fs::write(d.path().join(".staging-odd"), b"a file").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join(".staging-link")).unwrap();
        fs::write(outside.path().join("keep"), b"k").unwrap();
        fs::create_dir(d.path().join("1.2.0")).unwrap();
        fs::create_dir(d.path().join(".other")).unwrap();
        assert_eq!(
            remove_entries_with_prefix(d.path(), ".staging-").unwrap(),
            3
        );
        assert_eq!(names(d.path()), vec![".other", "1.2.0"]);
        assert!(
            outside.path().join("keep").exists(),
            "a link's target is left alone"
        );
        assert_eq!(
            remove_entries_with_prefix(d.path(), ".staging-").unwrap(),
            0
        );
        let missing = d.path().join("missing");
        assert_eq!(
            remove_entries_with_prefix(&missing, ".staging-").unwrap(),
            0
        );
    }

    #[test]
    fn symlink_switch_is_atomic_rename() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("current");
        switch_symlink(&link, Path::new("releases/1")).unwrap();
        switch_symlink(&link, Path::new("releases/2")).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("releases/2"));
    }
}
