//! Trust roots for `https` deployments: a PEM bundle named in config, loaded
//! and checked when the config is validated so a bad file is a config error
//! rather than a failed handshake at 3 a.m. The certificates are kept in the
//! validated config; routing hands them to each peer without reading the
//! file again.

use pingora::utils::tls::WrappedX509;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A CA bundle read from a file, in the form Pingora's connector takes per
/// peer.
#[derive(Clone)]
pub(crate) struct CaBundle {
    /// Where it was read from (for messages, and for connectors that take a path).
    pub(crate) path: PathBuf,
    pub(crate) certs: Arc<[WrappedX509]>,
    /// PEM items that are not certificates (a key kept in the same file):
    /// skipped here, refused by Pingora's connector when it reads the file.
    pub(super) other_items: usize,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certs", &self.certs.len())
            .field("other_items", &self.other_items)
            .finish()
    }
}

/// Why a CA bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a PEM certificate bundle: {source}", path.display())]
    NotPem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: unreadable certificate: {source}", path.display())]
    Certificate {
        path: PathBuf,
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    #[error("{}: not usable as a trust root: {source}", path.display())]
    NotAnAnchor {
        path: PathBuf,
        source: pingora::tls::RusTlsError,
    },
    #[error("{}: no certificates found", path.display())]
    Empty { path: PathBuf },
}

impl CaBundle {
    /// Read and parse a PEM bundle.
    pub(crate) fn load(path: &Path) -> Result<CaBundle, CaError> {
        let pem = std::fs::read(path).map_err(|source| CaError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = std::io::BufReader::new(pem.as_slice());
        let mut certs = Vec::new();
        let mut other_items = 0;
        // What the TLS connector does with each certificate, so that a
        // bundle accepted here is one a handshake can use.
        let mut roots = pingora::tls::RootCertStore::empty();
        for item in rustls_pemfile::read_all(&mut reader) {
            let item = item.map_err(|source| CaError::NotPem {
                path: path.to_path_buf(),
                source,
            })?;
            let rustls_pemfile::Item::X509Certificate(der) = item else {
                other_items += 1;
                continue;
            };
            roots
                .add(der.clone())
                .map_err(|source| CaError::NotAnAnchor {
                    path: path.to_path_buf(),
                    source,
                })?;
            let cert = WrappedX509::try_new(der.as_ref().to_vec(), |raw| {
                x509_parser::parse_x509_certificate(raw).map(|(_, cert)| cert)
            })
            .map_err(|source| CaError::Certificate {
                path: path.to_path_buf(),
                source,
            })?;
            certs.push(cert);
        }
        if certs.is_empty() {
            return Err(CaError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(CaBundle {
            path: path.to_path_buf(),
            certs: Arc::from(certs),
            other_items,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn yaml(file: &std::path::Path) -> String {
        let f = file.display();
        format!(
            "upstream_tls: {{ca_file: \"{f}\"}}\nmodels:\n  - {{name: m, fallback: [p]}}\npools:\n  - {{id: p, deployments: [{{deployment: d}}]}}\ndeployments:\n  - {{id: d, base_url: \"https://x.test/v1\", model: m, ca_file: \"{f}\"}}\n"
        )
    }

    #[test]
    fn bundles_are_loaded_and_checked_like_the_connector_does() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();

        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let c = Config::from_yaml(&yaml(&good), &|_| None).unwrap();
        assert_eq!(c.upstream_ca.as_ref().unwrap().certs.len(), 1);
        assert_eq!(c.deployments[0].ca.as_ref().unwrap().certs.len(), 1);
        // A key in the same file: the connector that reads
        // `upstream_tls.ca_file` itself refuses it, so validation does.
        let with_key = dir.path().join("ca-and-key.pem");
        std::fs::write(&with_key, ca.pem() + &key.serialize_pem()).unwrap();
        let errs = Config::from_yaml(&yaml(&with_key), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("upstream_tls.ca_file: ") && errs.contains("other than certificates"),
            "{errs}"
        );
        assert!(!errs.contains("deployments[0]"), "{errs}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        let errs = Config::from_yaml(&yaml(&empty), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("deployments[0].ca_file: ") && errs.contains("no certificates found"),
            "{errs}"
        );
    }
}
