//! The `Installer` port and the real filesystem installer.
//!
//! - `bundle`: the tar.gz is unpacked into `{root}/releases/.staging-{version}` (every entry
//!   checked to stay inside, files fsync'd), renamed to `{root}/releases/{version}`, then the
//!   `{root}/current` symlink is switched with an atomic rename. The previous release stays.
//! - `file`: the target is first copied to `{root}/files/{name}.prev` (crash-safe), then the
//!   artifact is copied next to the target, fsync'd and renamed over it.
//! - `command`: the verified artifact is handed to an existing installer (`rauc install
//!   {artifact}`); its `revert` argv goes back.
//!
//! Every step is all-or-nothing, and repeating a step after a crash is harmless, so an agent
//! restarted mid-install simply runs the install again.

use crate::cmd::{self, Subst};
use crate::error::{Error, Result};
use crate::state::{release_ref, Installed};
use ringcast_io::fs as fsutil;
use ringcast_proto::release::{InstallKind, Release};
use std::fs::{self, File};
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

/// A boxed, sendable future (keeps [`Installer`] object-safe without extra crates).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Activates releases and goes back. Implementations must be all-or-nothing per call and
/// safe to call again after a crash.
pub trait Installer: Send + Sync + std::fmt::Debug {
    /// Activate `release` from the verified `artifact`.
    fn install<'a>(
        &'a self,
        release: &'a Release,
        artifact: &'a Path,
    ) -> BoxFut<'a, Result<Installed>>;
    /// After `failed` was (perhaps partly) activated, make `back_to` active again (`None`:
    /// the device had no managed release before).
    fn revert<'a>(
        &'a self,
        failed: &'a Release,
        back_to: Option<&'a Installed>,
    ) -> BoxFut<'a, Result<()>>;
    /// Remove installed releases other than those in `keep`.
    fn prune(&self, keep: &[&Installed]) -> Result<()>;
    /// Remove what interrupted installs left behind and nothing will use again (the agent
    /// calls it at start-up and at revert, never while an install runs). Default: nothing.
    fn sweep(&self) -> Result<()> {
        Ok(())
    }
}

/// Name prefix of the directories bundles are unpacked into before their atomic rename.
const STAGING_PREFIX: &str = ".staging-";

/// The real installer, rooted at a directory (any directory: a simulator gives each agent its
/// own temp dir).
#[derive(Debug, Clone)]
pub struct FsInstaller {
    root: PathBuf,
    command_timeout: Duration,
    output_tail: usize,
}

impl FsInstaller {
    /// An installer rooted at `root`.
    pub fn new(root: impl Into<PathBuf>, command_timeout: Duration, output_tail: usize) -> Self {
        FsInstaller {
            root: root.into(),
            command_timeout,
            output_tail,
        }
    }

    /// `{root}/current`.
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }

    /// `{root}/releases/.staging-{version}`: where a bundle is unpacked before its rename.
    fn staging(&self, version: &str) -> PathBuf {
        self.releases().join(format!("{STAGING_PREFIX}{version}"))
    }

    fn backup_for(&self, target: &Path) -> PathBuf {
        let flat: String = target
            .to_string_lossy()
            .trim_start_matches('/')
            .chars()
            .map(|c| if c == '/' { '_' } else { c })
            .collect();
        self.root.join("files").join(format!("{flat}.prev"))
    }

    fn install_bundle(&self, release: &Release, artifact: &Path) -> Result<Installed> {
        let releases = self.releases();
        fsutil::ensure_dir(&releases)?;
        let version = release.version.to_string();
        let dir = releases.join(&version);
        let link = self.current_link();
        let points_here = fs::read_link(&link)
            .map(|t| t == Path::new("releases").join(&version))
            .unwrap_or(false);
        if !points_here {
            // A directory left by an interrupted attempt is not trusted: unpack again.
            fsutil::remove_dir_if_exists(&dir)?;
            let staging = self.staging(&version);
            fsutil::remove_dir_if_exists(&staging)?;
            let res = unpack_tar_gz(artifact, &staging).and_then(|()| {
                fs::rename(&staging, &dir).map_err(|e| Error::io("rename", &dir, e))?;
                Ok(fsutil::sync_dir(&releases)?)
            });
            if let Err(e) = res {
                let _ = fsutil::remove_dir_if_exists(&staging);
                return Err(e);
            }
            fsutil::switch_symlink(&link, &Path::new("releases").join(&version))?;
        }
        Ok(Installed {
            release: release_ref(release),
            kind: InstallKind::Bundle,
            location: dir.clone(),
            release_dir: dir,
        })
    }

    fn install_file(&self, release: &Release, artifact: &Path) -> Result<Installed> {
        let target = PathBuf::from(release.install.path.as_deref().unwrap_or_default());
        let backup = self.backup_for(&target);
        if let Some(d) = backup.parent() {
            fsutil::ensure_dir(d)?;
        }
        // Keep what is there now for revert — unless an interrupted attempt already put the
        // new bytes in place, in which case the backup it made is the one to keep.
        if target.exists() && !same_contents(&target, artifact) {
            fsutil::copy_atomic(&target, &backup)?;
        }
        fsutil::copy_atomic(artifact, &target)?;
        Ok(Installed {
            release: release_ref(release),
            kind: InstallKind::File,
            location: target.clone(),
            release_dir: target.parent().map(Path::to_path_buf).unwrap_or_default(),
        })
    }

    async fn install_command(&self, release: &Release, artifact: &Path) -> Result<Installed> {
        let argv = release.install.command.clone().unwrap_or_default();
        let dir = artifact.parent().map(Path::to_path_buf).unwrap_or_default();
        let s = Subst {
            release_dir: Some(&dir),
            artifact: Some(artifact),
        };
        let o = cmd::run(&argv, &s, self.command_timeout, self.output_tail).await;
        if !o.ok {
            return Err(Error::Install {
                code: "install_command_failed",
                detail: format!("{}: {}", o.status, o.tail),
            });
        }
        Ok(Installed {
            release: release_ref(release),
            kind: InstallKind::Command,
            location: artifact.to_owned(),
            release_dir: dir,
        })
    }

    fn revert_sync(&self, failed: &Release, back_to: Option<&Installed>) -> Result<()> {
        match failed.install.kind {
            InstallKind::Bundle => {
                let link = self.current_link();
                match back_to {
                    Some(prev) if prev.kind == InstallKind::Bundle => {
                        let rel = Path::new("releases").join(&prev.release.version);
                        fsutil::switch_symlink(&link, &rel)?;
                    }
                    _ => {
                        fsutil::remove_file_if_exists(&link)?;
                        fsutil::sync_parent(&link)?;
                    }
                }
                let failed_dir = self.releases().join(failed.version.to_string());
                if back_to.is_none_or(|p| p.location != failed_dir) {
                    fsutil::remove_dir_if_exists(&failed_dir)?;
                }
                Ok(())
            }
            InstallKind::File => {
                let target = PathBuf::from(failed.install.path.as_deref().unwrap_or_default());
                let backup = self.backup_for(&target);
                if backup.exists() {
                    fsutil::copy_atomic(&backup, &target)?;
                    fsutil::remove_file_if_exists(&backup)?;
                } else {
                    fsutil::remove_file_if_exists(&target)?;
                    fsutil::sync_parent(&target)?;
                }
                Ok(())
            }
            InstallKind::Command => Ok(()),
        }
    }
}

impl Installer for FsInstaller {
    fn install<'a>(
        &'a self,
        release: &'a Release,
        artifact: &'a Path,
    ) -> BoxFut<'a, Result<Installed>> {
        Box::pin(async move {
            match release.install.kind {
                InstallKind::Bundle | InstallKind::File => {
                    let me = self.clone();
                    let r = release.clone();
                    let a = artifact.to_owned();
                    tokio::task::spawn_blocking(move || match r.install.kind {
                        InstallKind::Bundle => me.install_bundle(&r, &a),
                        _ => me.install_file(&r, &a),
                    })
                    .await
                    .map_err(|e| Error::Install {
                        code: "install_panicked",
                        detail: e.to_string(),
                    })?
                }
                InstallKind::Command => self.install_command(release, artifact).await,
            }
        })
    }

    fn revert<'a>(
        &'a self,
        failed: &'a Release,
        back_to: Option<&'a Installed>,
    ) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            if failed.install.kind == InstallKind::Command {
                let Some(argv) = failed.install.revert.clone() else {
                    return Err(Error::Install {
                        code: "no_revert_command",
                        detail: format!(
                            "release {} {} has no install.revert",
                            failed.name, failed.version
                        ),
                    });
                };
                let artifact = back_to.map(|b| b.location.clone());
                let dir = artifact
                    .as_deref()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf);
                let s = Subst {
                    release_dir: dir.as_deref(),
                    artifact: artifact.as_deref(),
                };
                let o = cmd::run(&argv, &s, self.command_timeout, self.output_tail).await;
                if !o.ok {
                    return Err(Error::Install {
                        code: "revert_command_failed",
                        detail: format!("{}: {}", o.status, o.tail),
                    });
                }
                return Ok(());
            }
            let me = self.clone();
            let f = failed.clone();
            let b = back_to.cloned();
            tokio::task::spawn_blocking(move || me.revert_sync(&f, b.as_ref()))
                .await
                .map_err(|e| Error::Install {
                    code: "revert_panicked",
                    detail: e.to_string(),
                })?
        })
    }

    /// Remove every `{root}/releases/.staging-*`: an unpack interrupted by a crash (or more
    /// than one, of different versions) leaves one, and only an install of that same version
    /// would reuse its name; `prune` keeps hidden names.
    fn sweep(&self) -> Result<()> {
        let releases = self.releases();
        let removed = fsutil::remove_entries_with_prefix(&releases, STAGING_PREFIX)?;
        if removed > 0 {
            tracing::info!(removed, dir = %releases.display(), "removed leftovers of interrupted unpacks");
        }
        Ok(())
    }

    fn prune(&self, keep: &[&Installed]) -> Result<()> {
        let releases = self.releases();
        let Ok(rd) = fs::read_dir(&releases) else {
            return Ok(());
        };
        for entry in rd.flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let kept = keep.iter().any(|k| k.location == p);
            if !kept && !name.starts_with('.') {
                fsutil::remove_dir_if_exists(&p)?;
            }
        }
        Ok(())
    }
}

/// Whether two files hold the same bytes.
fn same_contents(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (fs::metadata(a), fs::metadata(b)) else {
        return false;
    };
    if ma.len() != mb.len() {
        return false;
    }
    let (Ok(mut fa), Ok(mut fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let (Ok(na), Ok(nb)) = (fa.read(&mut ba), fb.read(&mut bb)) else {
            return false;
        };
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

/// Check an archive path: relative, no `..`, no root or prefix (ACCEPTANCE.md case 10).
fn safe_relative(p: &Path) -> std::result::Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains '..'".into()),
            Component::RootDir | Component::Prefix(_) => return Err("is absolute".into()),
        }
    }
    Ok(out)
}

/// Whether a symlink at `entry` (relative to the release root) pointing to `target` stays
/// inside the release root.
fn link_stays_inside(entry: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = entry.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Unpack a tar.gz into `dest` (created), refusing any entry that would land outside it,
/// device nodes, hard links and escaping symlinks. Files are fsync'd, then the directories.
pub fn unpack_tar_gz(archive: &Path, dest: &Path) -> Result<()> {
    fsutil::ensure_dir(dest)?;
    let f = File::open(archive).map_err(|e| Error::io("open", archive, e))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    ar.set_preserve_permissions(true);
    let entries = ar
        .entries()
        .map_err(|e| Error::io("read archive", archive, e))?;
    let mut dirs = vec![dest.to_owned()];
    // Symlinks this archive created: no later entry may be written through one.
    let mut links: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::io("read archive", archive, e))?;
        let raw = entry
            .path()
            .map_err(|e| Error::io("read archive", archive, e))?
            .into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let rel = safe_relative(&raw).map_err(|detail| Error::UnsafeArchive {
            entry: shown.clone(),
            detail,
        })?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        if links.iter().any(|l| rel.starts_with(l)) {
            return Err(Error::UnsafeArchive {
                entry: shown,
                detail: "is written through a symlink".into(),
            });
        }
        let out = dest.join(&rel);
        let kind = entry.header().entry_type();
        if let Some(parent) = out.parent() {
            fsutil::ensure_dir(parent)?;
        }
        match kind {
            tar::EntryType::Directory => {
                fsutil::ensure_dir(&out)?;
                dirs.push(out);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = File::create(&out).map_err(|e| Error::io("create", &out, e))?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = entry
                        .read(&mut buf)
                        .map_err(|e| Error::io("read archive", archive, e))?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buf[..n])
                        .map_err(|e| Error::io("write", &out, e))?;
                }
                file.sync_all().map_err(|e| Error::io("fsync", &out, e))?;
                if let Ok(mode) = entry.header().mode() {
                    use std::os::unix::fs::PermissionsExt;
                    fs::set_permissions(&out, fs::Permissions::from_mode(mode & 0o777))
                        .map_err(|e| Error::io("chmod", &out, e))?;
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| Error::io("read archive", archive, e))?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if !link_stays_inside(&rel, &target) {
                    return Err(Error::UnsafeArchive {
                        entry: shown,
                        detail: format!("symlink to {} leaves the release", target.display()),
                    });
                }
                std::os::unix::fs::symlink(&target, &out)
                    .map_err(|e| Error::io("symlink", &out, e))?;
                links.push(rel);
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(Error::UnsafeArchive {
                    entry: shown,
                    detail: format!("entry type {other:?} is not allowed"),
                })
            }
        }
    }
    for d in dirs.iter().rev() {
        fsutil::sync_dir(d)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_are_checked() {
        assert!(safe_relative(Path::new("a/b")).is_ok());
        assert!(safe_relative(Path::new("./a")).is_ok());
        assert!(safe_relative(Path::new("../a")).is_err());
        assert!(safe_relative(Path::new("a/../../b")).is_err());
        assert!(safe_relative(Path::new("/etc/passwd")).is_err());
        assert!(link_stays_inside(Path::new("bin/x"), Path::new("../lib/y")));
        assert!(!link_stays_inside(Path::new("x"), Path::new("../y")));
        assert!(!link_stays_inside(Path::new("x"), Path::new("/etc")));
    }

    /// A real tar.gz holding one `VERSION` file.
    fn bundle_file(dir: &Path, version: &str) -> PathBuf {
        let path = dir.join(format!("{version}.tar.gz"));
        let gz = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut t = tar::Builder::new(gz);
        let body = format!("{version}\n");
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        t.append_data(&mut h, "VERSION", body.as_bytes()).unwrap();
        t.into_inner().unwrap().finish().unwrap();
        path
    }

    #[tokio::test]
    async fn sweep_removes_interrupted_unpacks_that_prune_keeps_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let inst = FsInstaller::new(d.path().join("root"), Duration::from_secs(5), 256);
        let r1 = ringcast_proto::testkit::sample_release("app", 1, 1);
        let a1 = bundle_file(d.path(), "1.1.0");
        let installed = inst.install(&r1, &a1).await.unwrap();
        // Two unpacks interrupted by crashes, of versions never installed again.
        for v in ["1.2.0", "1.3.0"] {
            let half = inst.staging(v).join("usr/lib");
            fs::create_dir_all(&half).unwrap();
            fs::write(half.join("partial.so"), b"half written").unwrap();
        }
        // Pruning keeps hidden names: on its own, nothing would ever remove them.
        inst.prune(&[&installed]).unwrap();
        assert!(inst.staging("1.2.0").exists());
        inst.sweep().unwrap();
        let mut left: Vec<String> = fs::read_dir(inst.releases())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["1.1.0"]);
        assert_eq!(
            fs::read_to_string(inst.current_link().join("VERSION")).unwrap(),
            "1.1.0\n"
        );
        // Nothing to sweep, or no releases directory at all: fine.
        inst.sweep().unwrap();
        FsInstaller::new(d.path().join("fresh"), Duration::from_secs(5), 256)
            .sweep()
            .unwrap();
    }
}
