//! Key files and crash-safe file writes for the offline command line.
//!
//! Private keys are PKCS#8 PEM written with mode 0600 from the moment the file exists (never
//! created readable and tightened afterwards), public keys SubjectPublicKeyInfo PEM: the formats
//! OpenSSL and every crypto library read (DESIGN.md "Command line"). Loading a private key that
//! group or others may read is refused, as OpenSSH does, because such a key may already have
//! leaked and signing with it would hide that.
//!
//! Every file goes through [`write_atomic`]: temp file in the same directory, write, fsync,
//! rename (or hard-link when overwriting is refused), fsync the directory. A crash leaves either
//! the old file or the new one, never a torn one.

use ed25519_dalek::VerifyingKey;
use ringcast_io::fs::{write_atomic_with, FsError, WriteOptions};
use ringcast_proto::keys::{public_from_pem, public_to_pem, PublicKey};
use ringcast_proto::SecretKey;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Largest key file read: real PEM keys are a few hundred bytes; anything far larger is not a key.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// Why a key file could not be written or read. Each variant has a stable reason code.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The target exists and overwriting was not asked for.
    #[error("key_exists: {path} already exists; refusing to overwrite a key (pass --force to replace it)")]
    Exists {
        /// The file that exists.
        path: PathBuf,
    },
    /// A private key file that group or others may read.
    #[error("insecure_permissions: {path} has mode {mode:04o}; a private key must not be readable by group or others (run `chmod 600 {path}` if it has not leaked, otherwise generate a new key)")]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a key in the expected format.
    #[error("bad_key_format: {path}: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The operating system refused.
    // The OS error is part of the message, not a `source`, so the CLI's one line (which
    // prints the cause chain) does not repeat it.
    #[error("io: {path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
}

impl KeyFileError {
    /// The stable `snake_case` reason code.
    pub fn code(&self) -> &'static str {
        match self {
            KeyFileError::Exists { .. } => "key_exists",
            KeyFileError::InsecurePermissions { .. } => "insecure_permissions",
            KeyFileError::Format { .. } => "bad_key_format",
            KeyFileError::Io { .. } => "io",
        }
    }

    fn io(path: &Path, error: io::Error) -> KeyFileError {
        KeyFileError::Io {
            path: path.to_owned(),
            error,
        }
    }

    fn format(path: &Path, detail: impl Into<String>) -> KeyFileError {
        KeyFileError::Format {
            path: path.to_owned(),
            detail: detail.into(),
        }
    }
}

/// Result alias for this module.
pub type Result<T, E = KeyFileError> = std::result::Result<T, E>;

/// Whether [`write_atomic`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Fail with [`KeyFileError::Exists`] if the target exists (checked atomically).
    Refuse,
    /// Atomically replace the target.
    Allow,
}

/// Write `bytes` to `path` crash-safely with permission `mode` from creation on: temp file in
/// the same directory, write, fsync, rename (or link, which fails atomically if the target
/// exists, when overwriting is refused), fsync the directory. The one implementation is
/// [`ringcast_io::fs::write_atomic_with`]; this maps its errors to [`KeyFileError`].
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, overwrite: Overwrite) -> Result<()> {
    let opts = WriteOptions {
        mode: Some(mode),
        overwrite: overwrite == Overwrite::Allow,
    };
    write_atomic_with(path, bytes, &opts).map_err(|e| match e {
        FsError::Exists { path } => KeyFileError::Exists { path },
        FsError::Io { path, source, .. } => KeyFileError::Io {
            path,
            error: source,
        },
    })
}

/// Write a private key as PKCS#8 PEM with mode 0600.
pub fn write_secret_key(path: &Path, key: &SecretKey, overwrite: Overwrite) -> Result<()> {
    write_atomic(path, key.to_pkcs8_pem().as_bytes(), 0o600, overwrite)
}

/// Write a public key as SubjectPublicKeyInfo PEM with mode 0644.
pub fn write_public_key(path: &Path, key: &VerifyingKey, overwrite: Overwrite) -> Result<()> {
    write_atomic(path, public_to_pem(key).as_bytes(), 0o644, overwrite)
}

/// Read a small text file (a key), refusing anything that is not a regular file of sane size.
fn read_key_text(path: &Path, private: bool) -> Result<String> {
    let mut f = File::open(path).map_err(|e| KeyFileError::io(path, e))?;
    // fstat on the open handle: the mode checked is the mode of the bytes read.
    let meta = f.metadata().map_err(|e| KeyFileError::io(path, e))?;
    if !meta.is_file() {
        return Err(KeyFileError::format(path, "not a regular file"));
    }
    if private {
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::format(
            path,
            format!("{} bytes is far too large for a key file", meta.len()),
        ));
    }
    let mut raw = Vec::new();
    Read::take(&mut f, MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| KeyFileError::io(path, e))?;
    String::from_utf8(raw).map_err(|_| {
        KeyFileError::format(
            path,
            "not a text PEM file (binary DER keys are not supported; convert with `openssl pkey -outform PEM`)",
        )
    })
}

/// Load an ed25519 private key from a PKCS#8 PEM file with mode 0600 (or stricter).
pub fn load_secret_key(path: &Path) -> Result<SecretKey> {
    let text = read_key_text(path, true)?;
    if text.contains("-----BEGIN PUBLIC KEY-----") {
        return Err(KeyFileError::format(
            path,
            "this is a public key (SPKI PEM); a private key (PKCS#8 PEM, the .key file of `ringcast key gen`) is needed",
        ));
    }
    if text.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
        return Err(KeyFileError::format(
            path,
            "this is an OpenSSH private key; ringcast reads PKCS#8 PEM (`ringcast key gen` writes one)",
        ));
    }
    if !text.contains("-----BEGIN PRIVATE KEY-----") {
        return Err(KeyFileError::format(
            path,
            "no `-----BEGIN PRIVATE KEY-----` block: not a PKCS#8 PEM private key",
        ));
    }
    SecretKey::from_pkcs8_pem(&text).map_err(|e| KeyFileError::format(path, e.detail))
}

/// Load an ed25519 public key: SubjectPublicKeyInfo PEM, or the JSON form
/// `{"scheme": "ed25519", "public": "<hex>"}` used inside trust roots.
pub fn load_public_key(path: &Path) -> Result<VerifyingKey> {
    let text = read_key_text(path, false)?;
    if text.contains("PRIVATE KEY-----") {
        return Err(KeyFileError::format(
            path,
            "this is a private key; pass the public key (the .pub file of `ringcast key gen`)",
        ));
    }
    if text.trim_start().starts_with('{') {
        let pk: PublicKey = serde_json::from_str(&text)
            .map_err(|e| KeyFileError::format(path, format!("public key JSON: {e}")))?;
        return pk
            .verifying_key()
            .map_err(|e| KeyFileError::format(path, e.detail));
    }
    if !text.contains("-----BEGIN PUBLIC KEY-----") {
        return Err(KeyFileError::format(
            path,
            "no `-----BEGIN PUBLIC KEY-----` block: not an SPKI PEM public key",
        ));
    }
    public_from_pem(&text).map_err(|e| KeyFileError::format(path, e.detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringcast_proto::testkit::key;
    use std::fs;

    #[test]
    fn secret_key_is_written_0600_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_secret_key(&p, &key(3), Overwrite::Refuse).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_secret_key(&p).unwrap().key_id(), key(3).key_id());
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn existing_key_is_not_overwritten_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_secret_key(&p, &key(3), Overwrite::Refuse).unwrap();
        let err = write_secret_key(&p, &key(4), Overwrite::Refuse).unwrap_err();
        assert_eq!(err.code(), "key_exists");
        assert_eq!(load_secret_key(&p).unwrap().key_id(), key(3).key_id());
        write_secret_key(&p, &key(4), Overwrite::Allow).unwrap();
        assert_eq!(load_secret_key(&p).unwrap().key_id(), key(4).key_id());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn replacing_a_readable_file_with_a_key_leaves_it_private_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_atomic(&p, b"not secret", 0o644, Overwrite::Refuse).unwrap();
        // Whatever the umask made of it, the file being replaced is world-readable.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        write_secret_key(&p, &key(5), Overwrite::Allow).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the new file's mode, not the replaced one's");
        assert_eq!(load_secret_key(&p).unwrap().key_id(), key(5).key_id());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_into_a_missing_directory_is_io_naming_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope").join("k.key");
        let err = write_secret_key(&p, &key(3), Overwrite::Refuse).unwrap_err();
        assert_eq!(err.code(), "io");
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn group_or_other_readable_key_is_refused_naming_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_secret_key(&p, &key(3), Overwrite::Refuse).unwrap();
        for mode in [0o644, 0o640, 0o604] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let err = load_secret_key(&p).unwrap_err();
            assert_eq!(err.code(), "insecure_permissions");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(msg.contains(&p.display().to_string()), "{msg}");
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_secret_key(&p).is_ok());
    }

    #[test]
    fn wrong_formats_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            write_atomic(&p, bytes, 0o600, Overwrite::Allow).unwrap();
            p
        };
        let garbage = write("garbage.key", b"hello, I am not a key\n");
        let err = load_secret_key(&garbage).unwrap_err();
        assert_eq!(err.code(), "bad_key_format");
        assert!(err.to_string().contains("BEGIN PRIVATE KEY"), "{err}");

        let pubpem = public_to_pem(&key(3).verifying_key());
        let public = write("pub-as-key.key", pubpem.as_bytes());
        assert!(load_secret_key(&public)
            .unwrap_err()
            .to_string()
            .contains("public key"));

        let binary = write("bin.key", &[0xff, 0xfe, 0x00, 0x01]);
        assert!(load_secret_key(&binary)
            .unwrap_err()
            .to_string()
            .contains("not a text PEM"));

        let broken = write(
            "broken.key",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        assert_eq!(
            load_secret_key(&broken).unwrap_err().code(),
            "bad_key_format"
        );

        let private = write("key-as-pub.pub", key(3).to_pkcs8_pem().as_bytes());
        assert!(load_public_key(&private)
            .unwrap_err()
            .to_string()
            .contains("private key"));
        assert_eq!(
            load_public_key(&garbage).unwrap_err().code(),
            "bad_key_format"
        );
    }

    #[test]
    fn public_key_reads_pem_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pub");
        write_public_key(&p, &key(3).verifying_key(), Overwrite::Refuse).unwrap();
        assert_eq!(load_public_key(&p).unwrap(), key(3).verifying_key());
        let j = dir.path().join("k.json");
        let json = serde_json::to_vec(&key(3).public()).unwrap();
        write_atomic(&j, &json, 0o644, Overwrite::Refuse).unwrap();
        assert_eq!(load_public_key(&j).unwrap(), key(3).verifying_key());
    }

    #[test]
    fn missing_file_is_io_naming_the_path() {
        let err = load_secret_key(Path::new("/nonexistent/ringcast.key")).unwrap_err();
        assert_eq!(err.code(), "io");
        assert!(err.to_string().contains("/nonexistent/ringcast.key"));
    }
}
