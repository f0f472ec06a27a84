//! `noexit-operator audit-keygen`: the real binary writes a usable key pair and never
//! overwrites an existing private key.

use std::process::Command;

fn keygen(dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .arg("audit-keygen")
        .arg("--private")
        .arg(dir.join("k.pem"))
        .arg("--public")
        .arg(dir.join("k.pub"))
        .output()
        .unwrap()
}

#[test]
fn writes_a_key_pair_once_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = keygen(dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("key id"));
    let signing = noexit_operator::audit::keys::load_signing_key(&dir.path().join("k.pem")).unwrap();
    let public = noexit_operator::audit::keys::load_verifying_key(&dir.path().join("k.pub")).unwrap();
    assert_eq!(signing.verifying_key(), public);

    let before = std::fs::read(dir.path().join("k.pem")).unwrap();
    let again = keygen(dir.path());
    assert!(!again.status.success(), "a second run must not replace the private key");
    assert!(String::from_utf8_lossy(&again.stderr).contains("k.pem"), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::read(dir.path().join("k.pem")).unwrap(), before);
}
