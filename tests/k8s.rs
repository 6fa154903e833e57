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
