//! The Kubernetes examples: valid against the Kubernetes schemas (kubernetes-validate, offline),
//! hardened as the plans require, and carrying exactly the shipped container config.

use std::process::Command;

const K8S: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/k8s");

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files: Vec<String> = std::fs::read_dir(K8S)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.30"])
        .args(&files)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; scripts/deps does) must be installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
}

#[test]
fn sidecar_is_hardened() {
    let d = std::fs::read_to_string(format!("{K8S}/deployment.yaml")).unwrap();
    for needle in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "capabilities: {drop: [\"ALL\"]}",
        "allowPrivilegeEscalation: false",
        "httpGet: {path: /healthz, port: admin}",
        "httpGet: {path: /readyz, port: admin}",
        "prometheus.io/scrape: \"true\"",
    ] {
        assert!(d.contains(needle), "deployment lacks {needle}");
    }
    assert!(!d.contains("subPath"), "subPath mounts never see Secret rotations");
}

#[test]
fn configmap_carries_the_shipped_container_config() {
    let cm = std::fs::read_to_string(format!("{K8S}/configmap.yaml")).unwrap();
    let body = cm.split_once("portcullis.toml: |\n").unwrap().1;
    let unindented: String = body.lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).collect::<Vec<_>>().join("\n");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/container.toml")).unwrap();
    assert_eq!(unindented.trim_end(), shipped.trim_end());
}

/// No Docker engine runs on the CI machines, so the image is checked offline: the Dockerfile's
/// shape, and that the binary it copies needs nothing beyond what distroless/cc provides and
/// runs as the image's non-root UID.
#[test]
fn dockerfile_builds_a_minimal_non_root_self_checking_image() {
    let root = env!("CARGO_MANIFEST_DIR");
    let df = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let lines: Vec<&str> = df.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains(" AS build"), "{froms:?}");
    assert!(froms[1].contains("gcr.io/distroless/cc-debian12"), "final stage is distroless (no shell): {froms:?}");
    assert!(df.contains("cargo build --release --locked --bin portcullis"));
    let user = lines.iter().find(|l| l.starts_with("USER ")).expect("USER");
    let uid: u32 =
        user[5..].split(':').next().unwrap().trim().parse().expect("numeric UID (runAsNonRoot can check it)");
    assert_ne!(uid, 0);
    assert!(
        df.contains(r#"CMD ["/usr/local/bin/portcullis", "health", "--config", "/etc/portcullis/portcullis.toml"]"#),
        "HEALTHCHECK in exec form through `portcullis health`"
    );
    assert!(df.contains(r#"ENTRYPOINT ["/usr/local/bin/portcullis"]"#));
    assert!(df.contains("COPY config/container.toml /etc/portcullis/portcullis.toml"));
    // the exposed ports are the shipped config's listeners and admin port
    let cfg = std::fs::read_to_string(format!("{root}/config/container.toml")).unwrap();
    let expose = lines.iter().find(|l| l.starts_with("EXPOSE ")).expect("EXPOSE");
    for port in expose[7..].split_whitespace() {
        assert!(cfg.contains(&format!(":{port}\"")), "EXPOSE {port} is a port of config/container.toml");
    }
    // shared libraries: only glibc and libgcc_s, which distroless/cc-debian12 ships
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let allowed = [
        "linux-vdso.so",
        "libgcc_s.so.1",
        "libm.so.6",
        "libc.so.6",
        "ld-linux-x86-64.so.2",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
    ];
    for l in text.lines() {
        let lib = l.split_whitespace().next().unwrap_or_default();
        let name = lib.rsplit('/').next().unwrap_or_default();
        assert!(allowed.iter().any(|a| name.starts_with(a)), "{name} is not in distroless/cc: {text}");
    }
    // runs as the image's UID with no home and no writable directory
    let out = Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
        .args([bin, "check", "--offline", "--config", &format!("{root}/config/container.toml")])
        .env_clear()
        .current_dir("/")
        .output()
        .expect("setpriv (util-linux)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
