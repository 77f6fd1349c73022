//! TLS to the broker, the same way for the daemon and the clients: CA
//! files are a PEM bundle that must hold at least one certificate, so a
//! wrong file is reported as such rather than as a failed handshake later;
//! and [`is_fatal`] tells a TLS failure retrying cannot fix from a network
//! one.

use std::path::Path;

/// System CA bundles, tried in order when no CA file is given.
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The PEM bytes of `path`, or of the first system bundle found when
/// `path` is `None`. The error names the file and what is wrong with it.
pub fn load_ca_pem(path: Option<&Path>) -> Result<Vec<u8>, String> {
    let path = match path {
        Some(p) => p,
        None => SYSTEM_CA_BUNDLES
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or_else(|| "no system CA bundle found; give a CA file".to_owned())?,
    };
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    let mut reader = std::io::BufReader::new(&pem[..]);
    let certs: Vec<_> = rustls_pemfile::certs(&mut reader)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(pem)
}

/// Why an MQTT 5 connection attempt failed for good, or `None` when
/// retrying may help: the broker refused who we are (credentials,
/// authorisation, client id, protocol version), or TLS could not verify
/// it ([`is_fatal`]). The one classifier for the daemon and the clients.
pub fn refusal_v5(e: &rumqttc::v5::ConnectionError) -> Option<String> {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(
            code @ (C::BadUserNamePassword
            | C::NotAuthorized
            | C::Banned
            | C::BadAuthenticationMethod
            | C::ClientIdentifierNotValid
            | C::UnsupportedProtocolVersion),
        ) => Some(format!("{code:?}")),
        E::Tls(t) if is_fatal(t) => Some(format!("TLS: {t}")),
        _ => None,
    }
}

/// [`refusal_v5`] for an MQTT 3.1.1 connection.
pub fn refusal_v4(e: &rumqttc::ConnectionError) -> Option<String> {
    use rumqttc::ConnectReturnCode as C;
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(
            code @ (C::BadUserNamePassword
            | C::NotAuthorized
            | C::BadClientId
            | C::RefusedProtocolVersion),
        ) => Some(format!("{code:?}")),
        E::Tls(t) if is_fatal(t) => Some(format!("TLS: {t}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_without_certificates() {
        let dir = std::env::temp_dir().join(format!("vllm-chat-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("not-a-ca.pem");
        std::fs::write(&f, "hello").unwrap();
        let e = load_ca_pem(Some(&f)).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = load_ca_pem(Some(&dir.join("missing.pem"))).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Whether a TLS failure is about the certificate or the configuration
/// (fatal: retrying only hides it) rather than the network. tokio-rustls
/// reports every handshake failure as an `io::Error`; the ones rustls
/// decided (a certificate from another CA, a name mismatch, an alert)
/// carry a `rustls::Error` inside. A reset or EOF mid-handshake (a broker
/// restarting, a load balancer closing a fresh connection) does not.
pub fn is_fatal(e: &rumqttc::TlsError) -> bool {
    match e {
        rumqttc::TlsError::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
        _ => true,
    }
}

#[cfg(test)]
mod fatal_tests {
    use super::is_fatal;
    use rumqttc::TlsError;
    use std::io;

    #[test]
    fn only_failures_rustls_decided_are_fatal() {
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer");
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        let cert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(!is_fatal(&TlsError::Io(reset)));
        assert!(!is_fatal(&TlsError::Io(eof)));
        assert!(is_fatal(&TlsError::Io(cert)));
        assert!(is_fatal(&TlsError::NoValidCertInChain));
    }
}
