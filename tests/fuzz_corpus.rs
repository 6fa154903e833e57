//! Every file of the fuzz corpora (`fuzz/corpus/<target>/`: seeds from `scripts/fuzz-seeds`,
//! plus any input a fuzzing run found interesting or that once crashed) through the same entry
//! points the cargo-fuzz targets call, on stable Rust: a crash found by fuzzing stays fixed.
//! `scripts/fuzz` runs the real fuzzers (nightly + cargo-fuzz).

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{target}: {} crashes", path.display());
        n += 1;
    }
    assert!(n >= 3, "{target}: only {n} corpus files");
}

#[test]
fn resp_batch_corpus() {
    replay("resp_batch", portcullis::fuzzing::resp_batch);
}

#[test]
fn pg_first_packet_corpus() {
    replay("pg_first_packet", portcullis::fuzzing::pg_first_packet);
}

#[test]
fn scram_corpus() {
    replay("scram", portcullis::fuzzing::scram);
}

#[test]
fn config_corpus() {
    replay("config", portcullis::fuzzing::config);
}

#[test]
fn ttl_corpus() {
    replay("ttl", portcullis::fuzzing::ttl);
}

#[test]
fn replies_corpus() {
    replay("replies", portcullis::fuzzing::replies);
}
