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
pub struct CaBundle {
    /// Where it was read from (for messages, and for connectors that take a path).
    pub path: PathBuf,
    pub certs: Arc<[WrappedX509]>,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certs", &self.certs.len())
            .finish()
    }
}

/// Why a CA bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
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
    #[error("{}: no certificates found", path.display())]
    Empty { path: PathBuf },
}

impl CaBundle {
    /// Read and parse a PEM bundle.
    pub fn load(path: &Path) -> Result<CaBundle, CaError> {
        let pem = std::fs::read(path).map_err(|source| CaError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = std::io::BufReader::new(pem.as_slice());
        let mut certs = Vec::new();
        for item in rustls_pemfile::certs(&mut reader) {
            let der = item.map_err(|source| CaError::NotPem {
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
        })
    }
}
