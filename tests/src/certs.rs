//! Certificates for mutual TLS, made by the shipped `deploy/make-certs.sh` so the tests
//! exercise the script operators use.

use crate::error::{HarnessError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The CN the shipped ACL grants full access to.
pub const CONTROLLER_CN: &str = "ringcast-controller";

/// The CN the shipped ACL grants read-only access to everything.
pub const OBSERVER_CN: &str = "ringcast-observer";

/// The shipped script.
pub fn make_certs_script() -> PathBuf {
    crate::deploy_dir().join("make-certs.sh")
}

/// Run the shipped script: `make-certs.sh OUT_DIR DEVICE...`. Returns its combined output on
/// success; a non-zero exit is [`HarnessError::CommandFailed`].
pub fn run_make_certs(out: &Path, devices: &[&str]) -> Result<String> {
    let script = make_certs_script();
    let output = Command::new("bash")
        .arg(&script)
        .arg(out)
        .args(devices)
        .output()
        .map_err(|e| HarnessError::io_path("running", &script, e))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    if !output.status.success() {
        return Err(HarnessError::CommandFailed {
            command: format!(
                "bash {} {} {}",
                script.display(),
                out.display(),
                devices.join(" ")
            ),
            status: output.status.to_string(),
            output: text.trim().to_owned(),
        });
    }
    Ok(text)
}

/// A client identity: certificate and private key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The certificate's CN: device id, or [`CONTROLLER_CN`].
    pub name: String,
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PKCS#8 PEM).
    pub key: PathBuf,
}

impl ClientCert {
    /// The PEM bytes (certificate, key), as rumqttc's `TlsConfiguration::Simple` takes them.
    pub fn pem_pair(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let cert = std::fs::read(&self.cert)
            .map_err(|e| HarnessError::io_path("reading", &self.cert, e))?;
        let key =
            std::fs::read(&self.key).map_err(|e| HarnessError::io_path("reading", &self.key, e))?;
        Ok((cert, key))
    }
}

/// A directory of certificates made by `make-certs.sh`: CA, broker, controller, devices.
#[derive(Debug, Clone)]
pub struct CertSet {
    dir: PathBuf,
}

impl CertSet {
    /// Make a CA, the broker and controller certificates and one per device in `dir`.
    pub fn generate(dir: &Path, devices: &[&str]) -> Result<CertSet> {
        run_make_certs(dir, devices)?;
        Ok(CertSet {
            dir: dir.to_path_buf(),
        })
    }

    /// Issue certificates for more devices from the same CA.
    pub fn add_devices(&self, devices: &[&str]) -> Result<()> {
        run_make_certs(&self.dir, devices).map(|_| ())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate both sides trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The CA certificate's PEM bytes.
    pub fn ca_pem(&self) -> Result<Vec<u8>> {
        let p = self.ca();
        std::fs::read(&p).map_err(|e| HarnessError::io_path("reading", &p, e))
    }

    /// The broker's certificate (SAN localhost, 127.0.0.1, ::1).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    /// The broker's private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The controller's identity (CN `ringcast-controller`). The shipped broker config makes
    /// the client id equal to the CN, so only one connection with it exists at a time.
    pub fn controller(&self) -> ClientCert {
        ClientCert {
            name: CONTROLLER_CN.to_owned(),
            cert: self.dir.join("controller.crt"),
            key: self.dir.join("controller.key"),
        }
    }

    /// The read-only observer's identity (CN `ringcast-observer`): watches every topic,
    /// publishes nothing. Use it to watch a scenario while the real controller is connected
    /// (the broker allows one connection per certificate).
    pub fn observer(&self) -> ClientCert {
        ClientCert {
            name: OBSERVER_CN.to_owned(),
            cert: self.dir.join("observer.crt"),
            key: self.dir.join("observer.key"),
        }
    }

    /// A device's identity (CN = device id). The files exist only for ids passed to
    /// [`CertSet::generate`] or [`CertSet::add_devices`].
    pub fn device(&self, id: &str) -> ClientCert {
        ClientCert {
            name: id.to_owned(),
            cert: self.dir.join("devices").join(format!("{id}.crt")),
            key: self.dir.join("devices").join(format!("{id}.key")),
        }
    }
}
