//! Who is calling: the tenant named by `X-Tenant-ID`, proven by one of its
//! API keys. Only SHA-256 digests of keys are kept, and the claimed tenant's
//! digests are compared in constant time.

use super::GatewayError;
use crate::outcome::Claimed;
use crate::state::Snapshot;
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub(crate) const TENANT_HEADER: &str = "x-tenant-id";

/// The index of the proven tenant.
pub(crate) fn admit(req: &RequestHeader, snap: &Snapshot) -> Result<usize, GatewayError> {
    let tenant_id = req
        .headers
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(GatewayError::MissingTenant)?;
    let key = presented_key(req).ok_or(GatewayError::MissingKey)?;
    let digest: [u8; 32] = Sha256::digest(key).into();

    let idx = snap
        .tenant_index(tenant_id)
        .ok_or(GatewayError::BadCredentials)?;
    let tenant = &snap.config.tenants[idx];
    // Compare against every digest of the tenant without stopping early.
    let matched = tenant
        .key_digests
        .iter()
        .fold(subtle::Choice::from(0), |acc, d| acc | d.ct_eq(&digest));
    if bool::from(matched) {
        return Ok(idx);
    }
    // A valid key of another tenant is a different mistake from a wrong key:
    // the caller is known, but may not act as the tenant it named.
    match snap.key_owner(&digest) {
        Some(_) => Err(GatewayError::ForeignKey),
        None => Err(GatewayError::BadCredentials),
    }
}

/// The tenant `X-Tenant-ID` names, if the header is there.
pub(crate) fn claimed(req: &RequestHeader, snap: &Snapshot) -> Option<Claimed> {
    let id = req
        .headers
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let Some(id) = id else {
        // Present but not text, or blank: named, but nothing to name.
        return req.headers.get(TENANT_HEADER).map(|_| Claimed::Unknown);
    };
    Some(
        snap.tenant_index(id)
            .map_or(Claimed::Unknown, Claimed::Tenant),
    )
}

/// A request names one tenant and presents one key, or is refused before
/// anything else: with two `X-Tenant-ID` (or `Authorization`, or `api-key`)
/// headers, which one counts would depend on who reads the request, and
/// `Authorization: Bearer` and `api-key` with different keys are two
/// identities too.
pub(crate) fn single_identity(req: &RequestHeader) -> Result<(), GatewayError> {
    for name in [TENANT_HEADER, "authorization", "api-key"] {
        if req.headers.get_all(name).iter().nth(1).is_some() {
            return Err(GatewayError::AmbiguousIdentity(name));
        }
    }
    let bearer = bearer_key(req);
    let api_key = api_key(req);
    if let (Some(a), Some(b)) = (bearer, api_key) {
        if a != b {
            return Err(GatewayError::AmbiguousIdentity("authorization"));
        }
    }
    Ok(())
}

fn bearer_key(req: &RequestHeader) -> Option<&[u8]> {
    req.headers.get(http::header::AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        v.get(..7)
            .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
            .map(|_| v[7..].trim_ascii())
    })
}

fn api_key(req: &RequestHeader) -> Option<&[u8]> {
    req.headers
        .get("api-key")
        .map(|v| v.as_bytes().trim_ascii())
}

/// The key from `Authorization: Bearer <key>`, else from `api-key` (Azure
/// style; an `Authorization` of another scheme does not hide it).
pub(crate) fn presented_key(req: &RequestHeader) -> Option<&[u8]> {
    bearer_key(req)
        .or_else(|| api_key(req))
        .filter(|k| !k.is_empty())
}

/// Hex SHA-256 of a key, as written in the config's `api_keys`.
pub fn key_digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}
