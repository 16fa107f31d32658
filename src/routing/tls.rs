//! Trust roots for `https` deployments: a PEM bundle named in config, loaded
//! and checked when the config is validated so a bad file is a config error
//! rather than a failed handshake at 3 a.m.

use pingora::utils::tls::WrappedX509;
use std::path::Path;

/// Read a PEM bundle into the form Pingora's connector takes per peer.
/// Errors are messages for the config report.
pub fn load_ca_file(path: &Path) -> Result<Vec<WrappedX509>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut reader = std::io::BufReader::new(pem.as_slice());
    let mut out = Vec::new();
    for item in rustls_pemfile::certs(&mut reader) {
        let der =
            item.map_err(|e| format!("{}: not a PEM certificate bundle: {e}", path.display()))?;
        let cert = WrappedX509::try_new(der.as_ref().to_vec(), |raw| {
            x509_parser::parse_x509_certificate(raw).map(|(_, cert)| cert)
        })
        .map_err(|e| format!("{}: unreadable certificate: {e}", path.display()))?;
        out.push(cert);
    }
    if out.is_empty() {
        return Err(format!("{}: no certificates found", path.display()));
    }
    Ok(out)
}
