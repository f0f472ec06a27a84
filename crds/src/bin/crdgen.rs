//! Writes `crds/*.yaml` from the Rust types: `cargo run -p noexit-crds --bin crdgen -- crds/`.
//! With `--check`, exits 1 when a file on disk differs (CI and the drift test use this).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut check = false;
    let mut dir = PathBuf::from("crds");
    for a in args.by_ref() {
        if a == "--check" {
            check = true;
        } else {
            dir = PathBuf::from(a);
        }
    }
    let mut drift = Vec::new();
    for (name, yaml) in noexit_crds::generated::files() {
        let path = dir.join(name);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                drift.push(path.display().to_string());
            }
        } else if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if !drift.is_empty() {
        eprintln!("crdgen: out of date (run `cargo run -p noexit-crds --bin crdgen -- crds/`): {}", drift.join(", "));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
