//! SCRAM-SHA-256 (RFC 5802 / 7677), both sides: the server side verifies clients against the
//! users file's verifiers (with `tls-server-end-point` channel binding for `-PLUS`), the client
//! side logs the proxy in upstream with the runtime role. Pure: no I/O, no async.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// SASL mechanism names as PostgreSQL spells them.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The channel-binding variant.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Why an exchange failed. `Auth` is a wrong password (28P01); the rest are protocol errors (08P01).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// The proof did not match: wrong password, or an unknown user's mock exchange.
    #[error("password authentication failed")]
    Auth,
    /// A message that does not parse.
    #[error("malformed SCRAM message")]
    Malformed,
    /// Channel binding data or flags do not match what this connection offers.
    #[error("SCRAM channel binding check failed")]
    ChannelBinding,
    /// The client wants channel binding the server did not advertise or vice versa.
    #[error("SCRAM channel binding negotiation error")]
    ChannelBindingNegotiation,
    /// Nonce in the final message is not the one agreed.
    #[error("SCRAM nonce mismatch")]
    Nonce,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length: this cannot fail.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("hmac takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// `Hi()` of RFC 5802: PBKDF2-HMAC-SHA-256.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// A stored verifier, `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` (PostgreSQL's format).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// Salt, raw bytes.
    pub salt: Vec<u8>,
    /// H(ClientKey).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramVerifier(iterations={})", self.iterations)
    }
}

impl ScramVerifier {
    /// Parses PostgreSQL's verifier format.
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iter.parse().ok().filter(|i| *i > 0)?;
        let salt = B64.decode(salt).ok()?;
        let stored_key = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramVerifier { iterations, salt, stored_key, server_key })
    }

    /// Derives a verifier from a password (used for tests and the mock exchange).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let prepared = stringprep::saslprep(password).map(|c| c.into_owned()).unwrap_or_else(|_| password.to_string());
        let salted = salted_password(prepared.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// PostgreSQL's text form (what `parse` reads).
    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    /// A stable fake verifier for a user that does not exist, so the exchange looks the same:
    /// the salt is derived from the name and a secret that survives restarts (PostgreSQL keeps
    /// its mock nonce in pg_control for the same reason), and `iterations` is the users file's
    /// usual count.
    pub fn mock(user: &str, secret: &[u8; 32], iterations: u32) -> ScramVerifier {
        let salt = hmac(secret, user.as_bytes());
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        ScramVerifier { iterations, salt: salt[..16].to_vec(), stored_key: key, server_key: key }
    }
}

/// Most iterations the proxy computes for an upstream's SCRAM challenge (PostgreSQL uses 4096).
pub const MAX_UPSTREAM_ITERATIONS: u32 = 1_000_000;

/// Salt and iteration count of a server-first message (to compute SaltedPassword off the
/// async workers before answering).
pub fn server_first_params(server_first: &[u8]) -> Result<(Vec<u8>, u32), ScramError> {
    let msg = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
    let mut parts = msg.split(',');
    let _nonce = attr(&mut parts, 'r')?;
    let salt = B64.decode(attr(&mut parts, 's')?).map_err(|_| ScramError::Malformed)?;
    let iterations: u32 = attr(&mut parts, 'i')?.parse().map_err(|_| ScramError::Malformed)?;
    if iterations == 0 || iterations > MAX_UPSTREAM_ITERATIONS {
        return Err(ScramError::Malformed);
    }
    Ok((salt, iterations))
}

/// What the client's gs2 header said about channel binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gs2Flag {
    /// `n`: client does not support it.
    No,
    /// `y`: client supports it but thinks the server does not.
    Yes,
    /// `p=tls-server-end-point`: client binds.
    Bind,
}

/// Server side, after the client-first message.
#[derive(Debug)]
pub struct ScramServer {
    /// One or more verifiers sharing salt and iteration count (a password rotation in progress).
    verifiers: Vec<ScramVerifier>,
    gs2_header: String,
    flag: Gs2Flag,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// Attribute `k=` from a comma-separated SCRAM message.
fn attr<'a>(parts: &mut impl Iterator<Item = &'a str>, key: char) -> Result<&'a str, ScramError> {
    let p = parts.next().ok_or(ScramError::Malformed)?;
    let mut chars = p.chars();
    if chars.next() != Some(key) || chars.next() != Some('=') {
        return Err(ScramError::Malformed);
    }
    Ok(&p[2..])
}

impl ScramServer {
    /// Handles `SASLInitialResponse`: `mechanism` is the one the client chose and
    /// `plus_offered` whether this connection advertised `-PLUS`. Returns the server-first message.
    /// `verifiers` share salt and iteration count (checked when the users file loads); any
    /// one of their passwords is accepted.
    pub fn start(
        verifiers: Vec<ScramVerifier>,
        mechanism: &str,
        plus_offered: bool,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        let mut parts = msg.splitn(3, ',');
        let cb = parts.next().ok_or(ScramError::Malformed)?;
        let authzid = parts.next().ok_or(ScramError::Malformed)?;
        let bare = parts.next().ok_or(ScramError::Malformed)?;
        let flag = match cb {
            "n" => Gs2Flag::No,
            "y" => Gs2Flag::Yes,
            "p=tls-server-end-point" => Gs2Flag::Bind,
            _ if cb.starts_with("p=") => return Err(ScramError::ChannelBindingNegotiation),
            _ => return Err(ScramError::Malformed),
        };
        if !authzid.is_empty() {
            return Err(ScramError::Malformed);
        }
        match (mechanism, flag) {
            (SCRAM_SHA_256_PLUS, Gs2Flag::Bind) if plus_offered => {}
            (SCRAM_SHA_256_PLUS, _) | (_, Gs2Flag::Bind) => {
                return Err(ScramError::ChannelBindingNegotiation);
            }
            // 'y' while we offered PLUS means something stripped it: a downgrade.
            (SCRAM_SHA_256, Gs2Flag::Yes) if plus_offered => {
                return Err(ScramError::ChannelBindingNegotiation);
            }
            (SCRAM_SHA_256, _) => {}
            _ => return Err(ScramError::Malformed),
        }
        let mut bp = bare.split(',');
        let _user = attr(&mut bp, 'n')?; // PostgreSQL uses the startup user, not this one.
        let client_nonce = attr(&mut bp, 'r')?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(ScramError::Malformed);
        }
        let mut raw = [0u8; 18];
        rand::fill(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let first = verifiers.first().ok_or(ScramError::Auth)?;
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&first.salt), first.iterations);
        let gs2_header = format!("{cb},{authzid},");
        Ok((
            ScramServer {
                verifiers,
                gs2_header,
                flag,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Handles the client-final message; `cb_data` is the `tls-server-end-point` hash of the
    /// certificate served on this connection. Returns the server-final message on success.
    pub fn finish(self, client_final: &[u8], cb_data: Option<&[u8]>) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let mut parts = without_proof.split(',');
        let c = attr(&mut parts, 'c')?;
        let r = attr(&mut parts, 'r')?;
        let c = B64.decode(c).map_err(|_| ScramError::Malformed)?;
        let mut expected = self.gs2_header.clone().into_bytes();
        if self.flag == Gs2Flag::Bind {
            expected.extend_from_slice(cb_data.ok_or(ScramError::ChannelBinding)?);
        }
        if c != expected {
            return Err(ScramError::ChannelBinding);
        }
        if r != self.nonce {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] =
            B64.decode(proof).map_err(|_| ScramError::Malformed)?.try_into().map_err(|_| ScramError::Malformed)?;
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        // Every verifier is tried (no early exit), so timing does not tell which one matched.
        let mut matched: Option<&ScramVerifier> = None;
        for v in &self.verifiers {
            let client_signature = hmac(&v.stored_key, auth_message.as_bytes());
            let mut client_key = [0u8; 32];
            for i in 0..32 {
                client_key[i] = proof[i] ^ client_signature[i];
            }
            if bool::from(sha256(&client_key).ct_eq(&v.stored_key)) {
                matched = matched.or(Some(v));
            }
        }
        let v = matched.ok_or(ScramError::Auth)?;
        let server_signature = hmac(&v.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// Client side (the proxy logging in upstream), without channel binding.
#[derive(Debug)]
pub struct ScramClient {
    client_nonce: String,
    client_first_bare: String,
}

/// Client side after the server-first message: holds the expected server signature.
#[derive(Debug)]
pub struct ScramClientFinal {
    server_signature: [u8; 32],
}

impl ScramClient {
    /// Starts an exchange; returns the client-first message (gs2 header `n,,`).
    pub fn start() -> (ScramClient, String) {
        let mut raw = [0u8; 18];
        rand::fill(&mut raw);
        let client_nonce = B64.encode(raw);
        let bare = format!("n=,r={client_nonce}");
        let first = format!("n,,{bare}");
        (ScramClient { client_nonce, client_first_bare: bare }, first)
    }

    /// Handles server-first; `salted` computes (or fetches from a cache) SaltedPassword for
    /// the given salt and iteration count. Returns the client-final message.
    pub fn respond(
        self,
        server_first: &[u8],
        salted: impl FnOnce(&[u8], u32) -> [u8; 32],
    ) -> Result<(ScramClientFinal, String), ScramError> {
        let msg = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
        let mut parts = msg.split(',');
        let nonce = attr(&mut parts, 'r')?;
        let salt = B64.decode(attr(&mut parts, 's')?).map_err(|_| ScramError::Malformed)?;
        let iterations: u32 = attr(&mut parts, 'i')?.parse().map_err(|_| ScramError::Malformed)?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() || iterations == 0 {
            return Err(ScramError::Nonce);
        }
        let salted = salted(&salt, iterations);
        let without_proof = format!("c={},r={nonce}", B64.encode(b"n,,"));
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = sha256(&client_key);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = client_key[i] ^ client_signature[i];
        }
        let server_key = hmac(&salted, b"Server Key");
        let server_signature = hmac(&server_key, auth_message.as_bytes());
        Ok((ScramClientFinal { server_signature }, format!("{without_proof},p={}", B64.encode(proof))))
    }
}

impl ScramClientFinal {
    /// Checks the server-final message (`v=<signature>`): the upstream proves it knows the verifier.
    pub fn verify(self, server_final: &[u8]) -> Result<(), ScramError> {
        let msg = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed)?;
        let v = msg.strip_prefix("v=").ok_or(ScramError::Auth)?;
        let sig = B64.decode(v.split(',').next().unwrap_or_default()).map_err(|_| ScramError::Malformed)?;
        if bool::from(sig.as_slice().ct_eq(&self.server_signature)) { Ok(()) } else { Err(ScramError::Auth) }
    }
}

/// SASLprep of a password, as libpq does before SCRAM (falls back to the raw bytes).
pub fn prepare_password(password: &str) -> String {
    stringprep::saslprep(password).map(|c| c.into_owned()).unwrap_or_else(|_| password.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(verifier: ScramVerifier, password: &str) -> Result<(), ScramError> {
        run_many(vec![verifier], password)
    }

    fn run_many(verifiers: Vec<ScramVerifier>, password: &str) -> Result<(), ScramError> {
        let (client, first) = ScramClient::start();
        let (server, server_first) = ScramServer::start(verifiers, SCRAM_SHA_256, false, first.as_bytes())?;
        let (client, fin) = client.respond(server_first.as_bytes(), |salt, i| {
            salted_password(prepare_password(password).as_bytes(), salt, i)
        })?;
        let server_final = server.finish(fin.as_bytes(), None)?;
        client.verify(server_final.as_bytes())
    }

    #[test]
    fn round_trip_and_wrong_password() {
        let v = ScramVerifier::from_password("s3cret", b"0123456789abcdef", 4096);
        assert_eq!(run(v.clone(), "s3cret"), Ok(()));
        assert_eq!(run(v, "wrong"), Err(ScramError::Auth));
    }

    #[test]
    fn rotation_accepts_either_password_with_a_shared_salt() {
        let old = ScramVerifier::from_password("old-pw", b"0123456789abcdef", 4096);
        let new = ScramVerifier::from_password("new-pw", b"0123456789abcdef", 4096);
        let both = vec![old.clone(), new.clone()];
        assert_eq!(run_many(both.clone(), "old-pw"), Ok(()));
        assert_eq!(run_many(both.clone(), "new-pw"), Ok(()), "the server proof comes from the matching verifier");
        assert_eq!(run_many(both, "other"), Err(ScramError::Auth));
        assert_eq!(run_many(vec![new], "old-pw"), Err(ScramError::Auth));
        assert_eq!(run_many(Vec::new(), "old-pw"), Err(ScramError::Auth));
        assert_eq!(ScramVerifier::parse(&old.encode()), Some(old));
    }

    #[test]
    fn postgres_verifier_format_parses() {
        let s = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&s).expect("parses");
        assert_eq!(run(v, "pw"), Ok(()));
        assert!(ScramVerifier::parse("md5abcdef").is_none());
        assert!(ScramVerifier::parse("SCRAM-SHA-256$0:AAAA$AAAA:AAAA").is_none());
    }

    #[test]
    fn channel_binding_rules() {
        let v = ScramVerifier::from_password("pw", b"salt", 4096);
        // PLUS chosen without binding flag, binding flag without PLUS, 'y' while PLUS offered.
        for (mech, first) in [
            (SCRAM_SHA_256_PLUS, "n,,n=,r=abc"),
            (SCRAM_SHA_256, "p=tls-server-end-point,,n=,r=abc"),
            (SCRAM_SHA_256, "y,,n=,r=abc"),
            (SCRAM_SHA_256_PLUS, "p=tls-unique,,n=,r=abc"),
        ] {
            assert_eq!(
                ScramServer::start(vec![v.clone()], mech, true, first.as_bytes()).unwrap_err(),
                ScramError::ChannelBindingNegotiation,
                "{mech} {first}"
            );
        }
        // 'y' is fine when PLUS was not offered.
        assert!(ScramServer::start(vec![v.clone()], SCRAM_SHA_256, false, b"y,,n=,r=abc").is_ok());
        // Bound exchange: wrong cb data fails, right one passes the binding check.
        let (s, _) =
            ScramServer::start(vec![v.clone()], SCRAM_SHA_256_PLUS, true, b"p=tls-server-end-point,,n=,r=abc").unwrap();
        let c = B64.encode(b"p=tls-server-end-point,,OTHER");
        let fin = format!("c={c},r={},p={}", s.nonce, B64.encode([0u8; 32]));
        assert_eq!(s.finish(fin.as_bytes(), Some(b"HASH")).unwrap_err(), ScramError::ChannelBinding);
    }

    #[test]
    fn mock_salt_is_stable_per_user_and_secret() {
        let a = ScramVerifier::mock("ghost", &[7; 32], 4096);
        let b = ScramVerifier::mock("ghost", &[7; 32], 4096);
        let c = ScramVerifier::mock("ghost2", &[7; 32], 4096);
        let d = ScramVerifier::mock("ghost", &[8; 32], 4096);
        assert_eq!(a.salt, b.salt);
        assert_ne!(a.salt, c.salt);
        assert_ne!(a.salt, d.salt);
        assert_eq!(ScramVerifier::mock("x", &[7; 32], 10000).iterations, 10000);
    }

    #[test]
    fn upstream_challenge_limits() {
        assert_eq!(server_first_params(b"r=abc,s=c2FsdA==,i=4096").unwrap(), (b"salt".to_vec(), 4096));
        assert!(server_first_params(b"r=abc,s=c2FsdA==,i=0").is_err());
        assert!(server_first_params(b"r=abc,s=c2FsdA==,i=4000000000").is_err());
        assert!(server_first_params(b"r=abc,i=4096").is_err());
    }

    #[test]
    fn malformed_inputs_do_not_panic() {
        let v = ScramVerifier::from_password("pw", b"salt", 4096);
        for bad in [&b""[..], b"n", b"n,,", b"n,,r=x", b"x,,n=,r=a", b"n,a=b,n=,r=x", b"n,,n=,r=", b"\xff\xfe"] {
            assert!(ScramServer::start(vec![v.clone()], SCRAM_SHA_256, false, bad).is_err());
        }
        let (s, _) = ScramServer::start(vec![v], SCRAM_SHA_256, false, b"n,,n=,r=abc").unwrap();
        assert_eq!(s.finish(b"garbage", None).unwrap_err(), ScramError::Malformed);
    }
}
