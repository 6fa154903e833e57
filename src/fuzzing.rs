//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and for the corpus replay test
//! (`tests/fuzz_corpus.rs`, which runs every corpus file through them on stable Rust). Each
//! takes arbitrary bytes and must not panic, hang or allocate beyond the limits it is given;
//! where the code has an invariant, it is asserted here.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::auth::scram::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramServer, ScramVerifier, server_first_params};
use crate::config::TtlRule;
use crate::policy::AclRules;
use crate::postgres::codec::{self, CodecError, MsgReader};
use crate::postgres::startup::{Startup, check_login};
use crate::redis::codec::{Limits, Partial, parse_request_resume, resolve};
use crate::redis::command::{CommandTable, Lookup};

fn table() -> &'static CommandTable {
    static T: OnceLock<CommandTable> = OnceLock::new();
    T.get_or_init(CommandTable::builtin)
}

fn rules() -> &'static [AclRules] {
    static R: OnceLock<Vec<AclRules>> = OnceLock::new();
    R.get_or_init(|| {
        ["+@all", "+@all -@dangerous ~app:* ~session:*", "-@all +get +client|setname +select|0 %R~ro:* ~*"]
            .iter()
            .filter_map(|r| AclRules::parse(r).ok())
            .collect()
    })
}

fn ttl_rules() -> Vec<TtlRule> {
    let rule = |pattern: &str, default: u64, max: u64| TtlRule {
        pattern: pattern.into(),
        default: Duration::from_secs(default),
        max: Duration::from_secs(max),
        allow_scripts: false,
    };
    vec![rule("session:*", 1800, 86400), rule("chat:*", 604_800, 2_592_000), rule("*", 60, 3600)]
}

/// The RESP request parser, fed the input in two reads (split where the first byte says) so the
/// resumable path runs too, authenticated or not; every parsed request is classified and
/// decided on as the session would.
pub fn resp_batch(data: &[u8]) {
    let Some((&ctl, data)) = data.split_first() else { return };
    let limits = Limits { max_bulk_len: 1 << 20, max_multibulk_len: 1 << 16 };
    let unauth = ctl & 1 == 1;
    let split = (ctl as usize >> 1).min(data.len());
    let mut buf = BytesMut::from(&data[..split]);
    let mut partial: Option<Partial> = None;
    let mut fed_rest = false;
    loop {
        let mut at = 0;
        let mut reqs = Vec::new();
        let mut failed = false;
        loop {
            match parse_request_resume(&buf, at, &limits, unauth, &mut partial) {
                Ok(Some(r)) => {
                    assert!(r.raw.end > at || r.raw.end == buf.len(), "the parser makes progress");
                    assert!(r.raw.end <= buf.len());
                    at = r.raw.end;
                    reqs.push(r);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(e.reply().starts_with(b"-ERR Protocol error: "));
                    failed = true;
                    break;
                }
            }
        }
        let bytes = buf.split_to(at).freeze();
        for req in &reqs {
            let args = resolve(&bytes, req);
            classify(&args);
        }
        if failed || fed_rest {
            return;
        }
        buf.extend_from_slice(&data[split..]);
        fed_rest = true;
    }
}

fn classify(args: &[&[u8]]) {
    let Lookup::Command(info) = table().resolve(args) else { return };
    let _ = info.arity_ok(args.len());
    let keys = info.keys(args);
    let _ = info.written_keys(args);
    for r in rules() {
        let _ = r.decide(&info.acl_ref(args.get(1).and_then(|a| std::str::from_utf8(a).ok())), &keys);
    }
    if info.arity_ok(args.len()) {
        ttl_plan(info, args);
    }
}

/// The TTL rewrite on a request: whatever it plans must encode to a request that parses back
/// to the planned arguments.
pub fn ttl(data: &[u8]) {
    let limits = Limits::default();
    let mut at = 0;
    let buf = Bytes::copy_from_slice(data);
    while let Ok(Some(r)) = parse_request_resume(&buf, at, &limits, false, &mut None) {
        at = r.raw.end;
        let args = resolve(&buf, &r);
        if let Lookup::Command(info) = table().resolve(&args)
            && info.arity_ok(args.len())
        {
            ttl_plan(info, &args);
        }
    }
}

fn ttl_plan(info: &crate::redis::command::CommandInfo, args: &[&[u8]]) {
    let plan = crate::redis::ttl::plan(info, args, &ttl_rules(), 1_700_000_000_000);
    if let Some(new) = plan.rewrite {
        let v: Vec<&[u8]> = new.iter().map(Vec::as_slice).collect();
        let enc = Bytes::from(crate::redis::codec::encode_command(&v));
        let back = parse_request_resume(&enc, 0, &Limits::default(), false, &mut None)
            .ok()
            .flatten()
            .expect("a rewritten request parses");
        assert_eq!(back.raw.end, enc.len());
        let got: Vec<&[u8]> = resolve(&enc, &back);
        assert_eq!(got.len(), new.len());
        assert!(got.iter().zip(&new).all(|(a, b)| *a == b.as_slice()), "rewrite round-trips");
    }
    for (k, secs) in plan.inject.iter().chain(plan.clamp_after.iter()) {
        assert!(!k.is_empty() || args.iter().any(|a| a.is_empty()));
        assert!(*secs > 0, "injected expiries are positive");
    }
}

/// Upstream replies framed for a session (the reply scanner, streaming of replies still
/// arriving, the order of proxy-made replies between them): the client's bytes must not depend
/// on how the reads split.
pub fn replies(data: &[u8]) {
    crate::redis::fuzz_read_splits(data);
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime")).block_on(f)
}

/// The PostgreSQL first-packet path: startup packets (SSLRequest, GSSENCRequest, Cancel,
/// StartupMessage) read as the listener reads them, parsed and checked against a deny-list;
/// then typed messages (the SASL exchange) from the rest.
pub fn pg_first_packet(data: &[u8]) {
    block_on(async {
        let mut r = MsgReader::new(data, BytesMut::new());
        for _ in 0..4 {
            let body = match r.startup_packet().await {
                Ok(b) => b,
                Err(CodecError::BadLength(_)) | Err(_) => return,
            };
            assert!(body.len() >= 4);
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            match code {
                codec::CODE_SSL | codec::CODE_GSSENC => continue,
                codec::CODE_CANCEL => {
                    let mut b = codec::Body(body.slice(4..));
                    let _ = (b.i32(), b.i32());
                    return;
                }
                _ => {
                    if let Ok(s) = Startup::parse(body) {
                        let _ = check_login(&s, &["postgres".to_string(), "admin".to_string()]);
                        let _ = s.needs_negotiation();
                        let _ = s.forwarded_params().count();
                    }
                    break;
                }
            }
        }
        for _ in 0..4 {
            let Ok(m) = r.message(8192).await else { return };
            if m.tag == b'p' {
                let _ = codec::parse_sasl_initial(m.body);
            }
        }
    })
}

/// The server side of SCRAM-SHA-256(-PLUS): client-first, then client-final, both from the
/// input (split at the first 0xff byte); the first byte picks the mechanism and whether -PLUS
/// was offered. Also the client side's parse of a server-first message.
pub fn scram(data: &[u8]) {
    let Some((&ctl, data)) = data.split_first() else { return };
    let _ = server_first_params(data);
    let (first, fin) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    static V: OnceLock<ScramVerifier> = OnceLock::new();
    let v = V.get_or_init(|| ScramVerifier::from_password("pw", b"0123456789abcdef", 4096)).clone();
    let mech = if ctl & 1 == 1 { SCRAM_SHA_256_PLUS } else { SCRAM_SHA_256 };
    let Ok((server, server_first)) = ScramServer::start(vec![v], mech, ctl & 2 == 2, first) else { return };
    assert!(server_first.starts_with("r="));
    let cb = [7u8; 32];
    let _ = server.finish(fin, (ctl & 4 == 4).then_some(&cb[..]));
}

/// The config parser and validator on arbitrary text: an error or a config, never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = crate::config::load_str(std::path::Path::new("fuzz.toml"), text) {
        let _ = e.to_string();
    }
}
