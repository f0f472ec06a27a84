//! Embeds the SQL migrations of each backend (`migrations/<backend>/NNNN_name.sql`) into the
//! binary, so a new migration file is picked up without touching any Rust code.

use std::{env, fs, path::Path};

fn main() {
    let out = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("migrations.rs");
    let mut code = String::new();
    for backend in ["sqlite", "postgres"] {
        let dir = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("migrations").join(backend);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<_> = fs::read_dir(&dir)
            .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "sql"));
        files.sort();
        code.push_str(&format!("pub static {}: &[(i64, &str, &str)] = &[\n", backend.to_uppercase()));
        for path in files {
            println!("cargo:rerun-if-changed={}", path.display());
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let (version, name) = stem.split_once('_').unwrap_or((stem, ""));
            let version: i64 =
                version.parse().unwrap_or_else(|_| panic!("migration {} must be named NNNN_name.sql", path.display()));
            code.push_str(&format!("    ({version}, {name:?}, include_str!({:?})),\n", path.display().to_string()));
        }
        code.push_str("];\n");
    }
    fs::write(out, code).expect("write migrations.rs");
}
