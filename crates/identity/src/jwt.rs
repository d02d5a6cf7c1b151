//! JWT-SVIDs (SPIFFE JWT-SVID spec): signing one with an ES256 key (`JwtSigningKey`), the
//! public keys of a trust domain as a SPIFFE JWT bundle (JWKS, `JwtBundle`), and validating a
//! token against it (`validate`: algorithm, key id, signature, `exp`, audience, `sub`). The
//! building blocks for the control plane's issuance and the proxy's `ValidateJWTSVID`; not wired
//! into either yet.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use thiserror::Error;

use crate::{SpiffeId, TrustDomain};

/// The longest token accepted for validation; a JWT-SVID is a few hundred bytes.
const MAX_TOKEN: usize = 8 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("malformed JWT-SVID: {0}")]
    Malformed(String),
    #[error("JWT-SVID algorithm {0:?} is not accepted (ES256 only)")]
    Algorithm(String),
    #[error(
        "JWT-SVID signed with key {kid:?}, which the JWT bundle of {trust_domain} does not hold"
    )]
    UnknownKey { kid: String, trust_domain: String },
    #[error("JWT-SVID signature does not verify with key {0:?}")]
    Signature(String),
    #[error("JWT-SVID expired {0}s ago")]
    Expired(u64),
    #[error("JWT-SVID is for audience {actual:?}, not {expected:?}")]
    Audience {
        expected: String,
        actual: Vec<String>,
    },
    #[error("JWT-SVID subject {0:?} is not a SPIFFE ID")]
    Subject(String),
    #[error("JWT-SVID subject {subject} is not in trust domain {trust_domain}")]
    TrustDomain {
        subject: String,
        trust_domain: String,
    },
    #[error("JWT signing key: {0}")]
    Key(String),
}

/// An ES256 (ECDSA P-256, SHA-256) signing key and its key id.
pub struct JwtSigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    key: EcdsaKeyPair,
}

impl std::fmt::Debug for JwtSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigningKey {
    /// A fresh key; its id is 16 random bytes, base64url.
    pub fn generate() -> Result<Self, JwtError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| JwtError::Key("cannot generate a P-256 key".into()))?;
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| JwtError::Key("no randomness".into()))?;
        Self::from_pkcs8(&B64.encode(id), pkcs8.as_ref())
    }

    /// A key read back from its PKCS#8 DER (as stored by its owner) with its id.
    pub fn from_pkcs8(kid: &str, pkcs8: &[u8]) -> Result<Self, JwtError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|e| JwtError::Key(format!("not a P-256 PKCS#8 key: {e}")))?;
        Ok(Self {
            kid: kid.to_string(),
            pkcs8: pkcs8.to_vec(),
            key,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 DER, for its owner to store (0600).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as a JWK of a SPIFFE JWT bundle (`use: jwt-svid`).
    pub fn public_jwk(&self) -> Value {
        // An uncompressed point: 0x04, x (32 bytes), y (32 bytes).
        let point = self.key.public_key().as_ref();
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(&point[1..33]),
            "y": B64.encode(&point[33..65]),
            "kid": self.kid,
            "use": "jwt-svid",
        })
    }

    /// A JWT-SVID for `subject`, valid for `audience` until `expires`.
    pub fn sign(
        &self,
        subject: &SpiffeId,
        audience: &[String],
        issued: SystemTime,
        expires: SystemTime,
    ) -> Result<String, JwtError> {
        if audience.is_empty() {
            return Err(JwtError::Malformed(
                "at least one audience is required".into(),
            ));
        }
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let claims = json!({
            "sub": subject.to_string(),
            "aud": audience,
            "iat": unix_seconds(issued),
            "exp": unix_seconds(expires),
        });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| JwtError::Key("signing failed".into()))?;
        Ok(format!(
            "{signing_input}.{}",
            B64.encode(signature.as_ref())
        ))
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// A trust domain's JWT authorities: public keys by key id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundle {
    /// kid → uncompressed P-256 point.
    keys: BTreeMap<String, Vec<u8>>,
}

impl JwtBundle {
    /// Adds the public key of `key` (a signing key being introduced or still valid).
    pub fn add(&mut self, key: &JwtSigningKey) {
        self.keys
            .insert(key.kid.clone(), key.key.public_key().as_ref().to_vec());
    }

    /// Drops a retired key.
    pub fn remove(&mut self, kid: &str) {
        self.keys.remove(kid);
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// The bundle as a JWKS (`{"keys": [...]}`), the SPIFFE bundle format's JWT part.
    pub fn to_jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|(kid, point)| {
                json!({
                    "kty": "EC",
                    "crv": "P-256",
                    "x": B64.encode(&point[1..33]),
                    "y": B64.encode(&point[33..65]),
                    "kid": kid,
                    "use": "jwt-svid",
                })
            })
            .collect();
        json!({ "keys": keys })
    }

    /// Reads a JWKS; keys for other uses (`x509-svid`) are skipped, a malformed JWT key refused.
    pub fn from_jwks(jwks: &Value) -> Result<Self, JwtError> {
        let bad = |why: &str| JwtError::Malformed(format!("JWT bundle: {why}"));
        let mut bundle = Self::default();
        for key in jwks["keys"].as_array().ok_or_else(|| bad("no keys list"))? {
            if key["use"] != "jwt-svid" {
                continue;
            }
            if key["kty"] != "EC" || key["crv"] != "P-256" {
                return Err(bad("only EC P-256 keys are supported"));
            }
            let kid = key["kid"]
                .as_str()
                .ok_or_else(|| bad("a key without kid"))?;
            let coordinate = |name: &str| {
                key[name]
                    .as_str()
                    .and_then(|s| B64.decode(s).ok())
                    .filter(|c| c.len() == 32)
                    .ok_or_else(|| bad(&format!("key {kid:?}: {name} is not 32 bytes base64url")))
            };
            let mut point = vec![0x04];
            point.extend(coordinate("x")?);
            point.extend(coordinate("y")?);
            bundle.keys.insert(kid.to_string(), point);
        }
        Ok(bundle)
    }
}

/// What a valid JWT-SVID says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidClaims {
    pub subject: SpiffeId,
    pub audience: Vec<String>,
    pub expires: SystemTime,
    /// Every claim, as the Workload API's ValidateJWTSVID returns them.
    pub claims: Value,
}

impl JwtSvidClaims {
    /// `iat`, or the Unix epoch when the token has none (`iat` is optional in a JWT-SVID): a
    /// revocation of the subject then covers the token whenever it was made.
    pub fn issued_at(&self) -> SystemTime {
        self.claims
            .get("iat")
            .and_then(Value::as_u64)
            .map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s))
    }
}

/// Validates `token` for `audience` at `now` against the JWT bundle of `trust_domain`: ES256
/// only, a `kid` the bundle holds, the signature, `exp` in the future, `audience` among `aud`,
/// and `sub` a SPIFFE ID of `trust_domain`.
pub fn validate(
    token: &str,
    trust_domain: &TrustDomain,
    bundle: &JwtBundle,
    audience: &str,
    now: SystemTime,
) -> Result<JwtSvidClaims, JwtError> {
    let malformed = |why: &str| JwtError::Malformed(why.to_string());
    if token.len() > MAX_TOKEN {
        return Err(malformed("longer than 8 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not three dot-separated parts"));
    };
    let decode_json = |part: &str, what: &str| -> Result<Value, JwtError> {
        let bytes = B64
            .decode(part)
            .map_err(|_| malformed(&format!("{what} is not base64url")))?;
        serde_json::from_slice(&bytes).map_err(|_| malformed(&format!("{what} is not JSON")))
    };
    let header_json = decode_json(header, "header")?;
    let alg = header_json["alg"].as_str().unwrap_or_default();
    if alg != "ES256" {
        return Err(JwtError::Algorithm(alg.to_string()));
    }
    let kid = header_json["kid"]
        .as_str()
        .ok_or_else(|| malformed("header has no kid"))?;
    let key = bundle.keys.get(kid).ok_or_else(|| JwtError::UnknownKey {
        kid: kid.to_string(),
        trust_domain: trust_domain.to_string(),
    })?;
    let signature = B64
        .decode(signature)
        .map_err(|_| malformed("signature is not base64url"))?;
    let signed = &token[..header.len() + 1 + payload.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| JwtError::Signature(kid.to_string()))?;

    // Only a signed payload is read further.
    let claims = decode_json(payload, "payload")?;
    let exp = claims["exp"]
        .as_u64()
        .ok_or_else(|| malformed("no numeric exp claim"))?;
    let expires = UNIX_EPOCH + Duration::from_secs(exp);
    if now >= expires {
        let ago = now.duration_since(expires).unwrap_or_default().as_secs();
        return Err(JwtError::Expired(ago));
    }
    let audiences: Vec<String> = match &claims["aud"] {
        Value::String(one) => vec![one.clone()],
        Value::Array(many) => many
            .iter()
            .map(|a| a.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| malformed("aud holds a non-string"))?,
        _ => return Err(malformed("no aud claim")),
    };
    if !audiences.iter().any(|a| a == audience) {
        return Err(JwtError::Audience {
            expected: audience.to_string(),
            actual: audiences,
        });
    }
    let sub = claims["sub"]
        .as_str()
        .ok_or_else(|| malformed("no sub claim"))?;
    let subject = SpiffeId::parse(sub).map_err(|_| JwtError::Subject(sub.to_string()))?;
    if subject.path().is_empty() {
        return Err(JwtError::Subject(sub.to_string()));
    }
    if !subject.is_member_of(trust_domain) {
        return Err(JwtError::TrustDomain {
            subject: sub.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    Ok(JwtSvidClaims {
        subject,
        audience: audiences,
        expires,
        claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn web() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap()
    }

    fn setup() -> (JwtSigningKey, JwtBundle, SystemTime) {
        let key = JwtSigningKey::generate().unwrap();
        let mut bundle = JwtBundle::default();
        bundle.add(&key);
        (key, bundle, SystemTime::now())
    }

    fn token(key: &JwtSigningKey, sub: &SpiffeId, aud: &[&str], now: SystemTime) -> String {
        let aud: Vec<String> = aud.iter().map(|a| a.to_string()).collect();
        key.sign(sub, &aud, now, now + Duration::from_secs(300))
            .unwrap()
    }

    /// A token with `header` and `claims` as given, signed by `key`.
    fn forged(key: &JwtSigningKey, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = key
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", B64.encode(signature.as_ref()))
    }

    #[test]
    fn a_signed_token_validates_with_its_claims() {
        let (key, bundle, now) = setup();
        let jwt = token(&key, &web(), &["db", "api"], now);
        let claims = validate(&jwt, &td(), &bundle, "api", now).unwrap();
        assert_eq!(claims.subject, web());
        assert_eq!(claims.audience, ["db", "api"]);
        assert_eq!(claims.claims["sub"], web().to_string());
        assert!(claims.expires > now);
        // The bundle survives its JWKS form, as peers receive it.
        let again = JwtBundle::from_jwks(&bundle.to_jwks()).unwrap();
        assert_eq!(again, bundle);
        assert!(validate(&jwt, &td(), &again, "db", now).is_ok());
        assert_eq!(key.public_jwk(), bundle.to_jwks()["keys"][0]);
        // A key stored and read back signs tokens the same bundle accepts.
        let reread = JwtSigningKey::from_pkcs8(key.kid(), key.pkcs8()).unwrap();
        assert!(
            validate(
                &token(&reread, &web(), &["x"], now),
                &td(),
                &bundle,
                "x",
                now
            )
            .is_ok()
        );
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let (key, bundle, now) = setup();
        let other_key = JwtSigningKey::generate().unwrap();
        let jwt = token(&key, &web(), &["api"], now);
        let later = now + Duration::from_secs(301);
        let other_td = SpiffeId::parse("spiffe://other.example/ns/demo/sa/web").unwrap();
        let exp = unix_seconds(now) + 300;
        let header = json!({"alg": "ES256", "kid": key.kid()});
        let cases: Vec<(String, JwtError)> = vec![
            (
                token(&key, &web(), &["db"], now),
                JwtError::Audience {
                    expected: "api".into(),
                    actual: vec!["db".into()],
                },
            ),
            (jwt.clone(), JwtError::Expired(1)),
            (
                token(&other_key, &web(), &["api"], now),
                JwtError::UnknownKey {
                    kid: other_key.kid().into(),
                    trust_domain: "cluster.local".into(),
                },
            ),
            (
                // Another key's signature under this key's id.
                forged(
                    &other_key,
                    header.clone(),
                    json!({"sub": web().to_string(), "aud": "api", "exp": exp}),
                ),
                JwtError::Signature(key.kid().into()),
            ),
            (
                token(&key, &other_td, &["api"], now),
                JwtError::TrustDomain {
                    subject: other_td.to_string(),
                    trust_domain: "cluster.local".into(),
                },
            ),
            (
                forged(
                    &key,
                    header.clone(),
                    json!({"sub": "spiffe://cluster.local", "aud": "api", "exp": exp}),
                ),
                JwtError::Subject("spiffe://cluster.local".into()),
            ),
            (
                forged(
                    &key,
                    json!({"alg": "none", "kid": key.kid()}),
                    json!({"sub": web().to_string(), "aud": "api", "exp": exp}),
                ),
                JwtError::Algorithm("none".into()),
            ),
            (
                forged(
                    &key,
                    json!({"alg": "HS256", "kid": key.kid()}),
                    json!({"sub": web().to_string(), "aud": "api", "exp": exp}),
                ),
                JwtError::Algorithm("HS256".into()),
            ),
            (
                forged(
                    &key,
                    header.clone(),
                    json!({"sub": web().to_string(), "aud": "api"}),
                ),
                JwtError::Malformed("no numeric exp claim".into()),
            ),
            (
                forged(&key, header, json!({"sub": web().to_string(), "exp": exp})),
                JwtError::Malformed("no aud claim".into()),
            ),
            (
                "a.b".into(),
                JwtError::Malformed("not three dot-separated parts".into()),
            ),
        ];
        for (i, (jwt, expected)) in cases.into_iter().enumerate() {
            let at = if matches!(expected, JwtError::Expired(_)) {
                later
            } else {
                now
            };
            assert_eq!(
                validate(&jwt, &td(), &bundle, "api", at).unwrap_err(),
                expected,
                "case {i}"
            );
        }
        // A changed payload breaks the signature.
        let mut parts: Vec<&str> = jwt.split('.').collect();
        let tampered = B64.encode(
            json!({"sub": "spiffe://cluster.local/ns/demo/sa/admin", "aud": "api", "exp": exp})
                .to_string(),
        );
        parts[1] = &tampered;
        assert_eq!(
            validate(&parts.join("."), &td(), &bundle, "api", now).unwrap_err(),
            JwtError::Signature(key.kid().into())
        );
    }

    #[test]
    fn a_rotated_bundle_keeps_validating_tokens_of_the_previous_key() {
        let (old, mut bundle, now) = setup();
        let before = token(&old, &web(), &["api"], now);
        let new = JwtSigningKey::generate().unwrap();
        bundle.add(&new);
        let after = token(&new, &web(), &["api"], now);
        assert!(validate(&before, &td(), &bundle, "api", now).is_ok());
        assert!(validate(&after, &td(), &bundle, "api", now).is_ok());
        bundle.remove(old.kid());
        assert!(matches!(
            validate(&before, &td(), &bundle, "api", now),
            Err(JwtError::UnknownKey { .. })
        ));
    }

    #[test]
    fn jwks_keys_for_other_uses_are_skipped_and_bad_jwt_keys_refused() {
        let (key, _, _) = setup();
        let mut x509 = key.public_jwk();
        x509["use"] = json!("x509-svid");
        let bundle = JwtBundle::from_jwks(&json!({"keys": [x509]})).unwrap();
        assert_eq!(bundle.kids().count(), 0);
        let mut short = key.public_jwk();
        short["x"] = json!("AAAA");
        assert!(JwtBundle::from_jwks(&json!({"keys": [short]})).is_err());
        let mut rsa = key.public_jwk();
        rsa["kty"] = json!("RSA");
        assert!(JwtBundle::from_jwks(&json!({"keys": [rsa]})).is_err());
    }
}
