//! A throw-away PKI for TLS tests: a CA, a server certificate for
//! 127.0.0.1 signed by it, and an unrelated second CA to be refused.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// `ca.pem`, `other-ca.pem`, `server.pem` or `server.key`.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Mosquitto config lines for a TLS listener on `port` with this PKI.
    pub fn listener_conf(&self, port: u16) -> String {
        format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            self.path("ca.pem"),
            self.path("server.pem"),
            self.path("server.key")
        )
    }
}

/// Generates the PKI into a fresh temporary directory.
pub fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let cert = p.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca_cert, ca_key) = ca("vllm-mqttd");
    let (other_cert, _) = ca("other");
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca_cert, &ca_key)
        .unwrap();
    let write = |n: &str, s: String| std::fs::write(dir.path().join(n), s).unwrap();
    write("ca.pem", ca_cert.pem());
    write("other-ca.pem", other_cert.pem());
    write("server.pem", server.pem());
    write("server.key", server_key.serialize_pem());
    Pki { dir }
}
