//! Inbound authentication (SPEC §4.4): every configured check must pass; comparisons
//! are constant-time, also across secrets of different lengths, and a failure never
//! says which check failed.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::InboundAuth;
use crate::event::HUB_SIGNATURE;

/// Checks made before the body is read (token, Basic).
pub fn check_headers(auth: &InboundAuth, headers: &HeaderMap) -> bool {
    if let Some(token) = &auth.token {
        let presented = match &auth.token_header {
            Some(name) => headers.get(name).map(|v| v.as_bytes()),
            None => bearer(headers),
        };
        if !presented.is_some_and(|p| ct_eq(p, token.expose().as_bytes())) {
            return false;
        }
    }
    if let Some(expected) = &auth.basic_auth {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| strip_scheme(v, "basic"))
            .and_then(|b64| BASE64.decode(b64.trim()).ok())
            .is_some_and(|decoded| ct_eq(&decoded, expected.expose().as_bytes()));
        if !ok {
            return false;
        }
    }
    true
}

/// The body signature check (needs the raw body).
pub fn check_body(auth: &InboundAuth, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(secret) = &auth.hmac_secret else {
        return true;
    };
    let Some(given) = headers
        .get(HUB_SIGNATURE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("sha256="))
        .and_then(|b64| BASE64.decode(b64).ok())
    else {
        return false;
    };
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&given).is_ok()
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    strip_scheme(v, "bearer").map(|t| t.trim().as_bytes())
}

fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = value.trim().split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then_some(rest)
}

/// Compares a presented credential with the expected one in time independent of both.
///
/// `subtle` compares equal-length slices in constant time but returns at once when the
/// lengths differ, which tells an attacker the secret's length. Comparing the SHA-256
/// digests instead always compares 32 bytes with 32 bytes, whatever was presented.
fn ct_eq(presented: &[u8], expected: &[u8]) -> bool {
    comparable(presented).ct_eq(&comparable(expected)).into()
}

/// What [`ct_eq`] actually compares: a fixed-size digest of the value.
fn comparable(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http::HeaderValue;

    fn auth(vars: &[(&str, &str)]) -> InboundAuth {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap()
            .inbound
    }

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn nothing_configured_lets_everything_in() {
        assert!(check_headers(&auth(&[]), &HeaderMap::new()));
        assert!(check_body(&auth(&[]), &HeaderMap::new(), b"{}"));
    }

    #[test]
    fn bearer_and_custom_header_tokens() {
        let a = auth(&[("INBOUND_TOKEN", "t0k")]);
        assert!(check_headers(&a, &h(&[("authorization", "Bearer t0k")])));
        assert!(!check_headers(&a, &h(&[("authorization", "Bearer nope")])));
        assert!(!check_headers(&a, &HeaderMap::new()));
        let a = auth(&[
            ("INBOUND_TOKEN", "t0k"),
            ("INBOUND_TOKEN_HEADER", "X-Api-Key"),
        ]);
        assert!(check_headers(&a, &h(&[("x-api-key", "t0k")])));
        assert!(!check_headers(&a, &h(&[("authorization", "Bearer t0k")])));
    }

    #[test]
    fn secrets_of_any_length_are_compared_as_equal_size_digests() {
        let expected = b"the-configured-secret";
        for len in [0, 1, 20, 21, 22, 64, 4096] {
            let presented = vec![b'x'; len];
            // Same size whatever the length: no early return on a length mismatch.
            assert_eq!(comparable(&presented).len(), comparable(expected).len());
            assert!(!ct_eq(&presented, expected), "length {len}");
        }
        assert!(ct_eq(expected, expected));
        // A prefix or an extension of the secret is not the secret.
        assert!(!ct_eq(b"the-configured-secre", expected));
        assert!(!ct_eq(b"the-configured-secret!", expected));

        let a = auth(&[("INBOUND_TOKEN", "short")]);
        for presented in ["shor", "short-but-longer", "", "x"] {
            let bearer = format!("Bearer {presented}");
            assert!(!check_headers(&a, &h(&[("authorization", &bearer)])));
        }
        assert!(check_headers(&a, &h(&[("authorization", "Bearer short")])));
    }

    #[test]
    fn basic_auth() {
        let a = auth(&[("INBOUND_BASIC_AUTH", "genesys:pa:ss")]);
        let good = format!("Basic {}", BASE64.encode("genesys:pa:ss"));
        let bad = format!("Basic {}", BASE64.encode("genesys:wrong"));
        assert!(check_headers(&a, &h(&[("authorization", &good)])));
        assert!(!check_headers(&a, &h(&[("authorization", &bad)])));
    }

    #[test]
    fn hmac_signature() {
        let a = auth(&[("INBOUND_HMAC_SECRET", "key")]);
        // echo -n '{"a":1}' | openssl dgst -sha256 -hmac key -binary | base64
        let sig = "sha256=iKZ/JLvNrtDmyZdAS7eadDuvRMa6svTCcyjjAJ0i40I=";
        assert!(check_body(
            &a,
            &h(&[("x-hub-signature-256", sig)]),
            br#"{"a":1}"#
        ));
        assert!(!check_body(
            &a,
            &h(&[("x-hub-signature-256", sig)]),
            br#"{"a":2}"#
        ));
        assert!(!check_body(&a, &HeaderMap::new(), br#"{"a":1}"#));
    }
}
