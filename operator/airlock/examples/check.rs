//! Run the airlock's automatic checks on a file, as the control plane does, and print the
//! report (JSON). For output checkers trying a file offline and for the docs' examples.
//!
//!     cargo run -p noexit-airlock --example check -- FILE [--metadata META.json]
//!         [--acro results.json] [--min-cell-count N] [--html OUT.html]

use std::process::ExitCode;

use noexit_airlock::checks::{OutputMetadata, Policy, Submission, run};
use noexit_airlock::render::review_html;

fn main() -> ExitCode {
    match main_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("check: {e}");
            ExitCode::from(2)
        }
    }
}

fn main_inner() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    let (mut meta_path, mut acro_path, mut html_path) = (None, None, None);
    let mut policy = Policy::default();
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        match a.as_str() {
            "--metadata" => meta_path = Some(value("--metadata")?),
            "--acro" => acro_path = Some(value("--acro")?),
            "--html" => html_path = Some(value("--html")?),
            "--min-cell-count" => {
                policy.min_cell_count =
                    value("--min-cell-count")?.parse().map_err(|e| format!("--min-cell-count: {e}"))?
            }
            _ if file.is_none() && !a.starts_with("--") => file = Some(a),
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    let file = file.ok_or("usage: check FILE [--metadata META.json] [--acro results.json] [--html OUT.html]")?;
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("{p}: {e}"));
    let bytes = read(&file)?;
    let meta: Option<OutputMetadata> = match &meta_path {
        Some(p) => Some(serde_json::from_slice(&read(p)?).map_err(|e| format!("{p}: {e}"))?),
        None => None,
    };
    let acro = acro_path.as_deref().map(read).transpose()?;
    let sub = Submission { file_name: &file, bytes: &bytes, metadata: meta.as_ref(), acro_results: acro.as_deref() };
    let report = run(&sub, &policy);
    println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    if let Some(p) = html_path {
        std::fs::write(&p, review_html(&file, &bytes, &report)).map_err(|e| format!("{p}: {e}"))?;
    }
    Ok(())
}
