//! Who is calling: the tenant named by `X-Tenant-ID`, proven by one of its
//! API keys. Only SHA-256 digests of keys are kept, and the claimed tenant's
//! digests are compared in constant time.

use super::GatewayError;
use crate::outcome::Claimed;
use crate::state::Snapshot;
use http::HeaderName;
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

// The request-head names read on every request, as `HeaderName`s: a
// lookup by `&str` parses the name again each time.
pub(crate) static TENANT_HEADER: HeaderName = HeaderName::from_static("x-tenant-id");
/// Names the application's end user; wins over the body's `user`.
pub(crate) static USER_HEADER: HeaderName = HeaderName::from_static("x-user-id");
static AUTHORIZATION: HeaderName = http::header::AUTHORIZATION;
static API_KEY: HeaderName = HeaderName::from_static("api-key");
/// The longest end-user id kept as sent, in bytes.
pub(crate) const MAX_USER_LEN: usize = 128;

/// The index of the proven tenant.
pub(crate) fn admit(req: &RequestHeader, snap: &Snapshot) -> Result<usize, GatewayError> {
    let tenant_id = req
        .headers
        .get(&TENANT_HEADER)
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
        .get(&TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let Some(id) = id else {
        // Present but not text, or blank: named, but nothing to name.
        return req.headers.get(&TENANT_HEADER).map(|_| Claimed::Unknown);
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
    for name in [&TENANT_HEADER, &AUTHORIZATION, &API_KEY, &USER_HEADER] {
        if req.headers.get_all(name).iter().nth(1).is_some() {
            return Err(GatewayError::AmbiguousIdentity(name.as_str()));
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
    req.headers.get(&AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        v.get(..7)
            .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
            .map(|_| v[7..].trim_ascii())
    })
}

fn api_key(req: &RequestHeader) -> Option<&[u8]> {
    req.headers.get(&API_KEY).map(|v| v.as_bytes().trim_ascii())
}

/// The key from `Authorization: Bearer <key>`, else from `api-key` (Azure
/// style; an `Authorization` of another scheme does not hide it).
pub(crate) fn presented_key(req: &RequestHeader) -> Option<&[u8]> {
    bearer_key(req)
        .or_else(|| api_key(req))
        .filter(|k| !k.is_empty())
}

/// The end user a request names, as it is recorded: the `X-User-ID`
/// header when present, else the body's `user` (OpenAI's field). It is the
/// application's free text, attributed within the proven tenant and never
/// trusted for anything else. Kept as sent when it is 1 to
/// [`MAX_USER_LEN`] bytes of visible ASCII (`!` to `~`: ids, e-mail
/// addresses, UUIDs, hashes); anything else — longer, spaces, control or
/// non-ASCII characters, which is not an id and may be a pasted secret or
/// a whole prompt — only as a fingerprint, `invalid:<12 hex digits>`. With
/// `hashed`, a valid id too is kept only as `sha256:<16 hex digits>`
/// (unkeyed: it hides the id from a casual reader of the trail, not from
/// someone who can guess it).
pub(crate) fn end_user(
    req: &RequestHeader,
    body_user: Option<&str>,
    hashed: bool,
) -> Option<String> {
    let named = match req.headers.get(&USER_HEADER) {
        Some(v) => v.as_bytes().trim_ascii(),
        None => body_user?.as_bytes(),
    };
    if named.is_empty() {
        return None;
    }
    let valid = named.len() <= MAX_USER_LEN && named.iter().all(|b| (0x21..=0x7e).contains(b));
    Some(match (valid, hashed) {
        (true, false) => String::from_utf8_lossy(named).into_owned(),
        (false, _) => format!("invalid:{}", hex::encode(&Sha256::digest(named)[..6])),
        (true, true) => format!("sha256:{}", hex::encode(&Sha256::digest(named)[..8])),
    })
}

/// Hex SHA-256 of a key, as written in the config's `api_keys`.
pub fn key_digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(user: Option<&[u8]>) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        if let Some(u) = user {
            r.insert_header(
                USER_HEADER.clone(),
                http::HeaderValue::from_bytes(u).unwrap(),
            )
            .unwrap();
        }
        r
    }

    #[test]
    fn the_end_user_is_kept_only_when_it_looks_like_an_id() {
        // The header wins over the body; either alone counts.
        assert_eq!(
            end_user(&req(Some(b"u-42")), Some("body"), false).as_deref(),
            Some("u-42")
        );
        assert_eq!(
            end_user(&req(None), Some("a@b.example"), false).as_deref(),
            Some("a@b.example")
        );
        assert_eq!(end_user(&req(None), None, false), None);
        assert_eq!(end_user(&req(Some(b"  ")), Some("body"), false), None);
        // Too long, spaces, non-ASCII: a fingerprint only, the same for the same text.
        let long = "x".repeat(MAX_USER_LEN + 1);
        let fp = end_user(&req(None), Some(&long), false).unwrap();
        assert!(fp.starts_with("invalid:") && fp.len() == 8 + 12, "{fp}");
        assert_eq!(end_user(&req(None), Some(&long), false).unwrap(), fp);
        assert!(
            end_user(&req(None), Some("two words"), false)
                .unwrap()
                .starts_with("invalid:")
        );
        assert!(
            end_user(&req(None), Some("jürgen"), false)
                .unwrap()
                .starts_with("invalid:")
        );
        assert_eq!(
            end_user(&req(None), Some(&"y".repeat(MAX_USER_LEN)), false).map(|u| u.len()),
            Some(MAX_USER_LEN)
        );
        // Hashed: the same digest for the same id, never the id.
        let h = end_user(&req(None), Some("u-42"), true).unwrap();
        assert!(h.starts_with("sha256:") && !h.contains("u-42"), "{h}");
        assert_eq!(end_user(&req(Some(b"u-42")), None, true).unwrap(), h);
    }
}
