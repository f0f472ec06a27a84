//! `noexit-operator render`: the operator's dry run.

use std::path::PathBuf;

/// Arguments of `noexit-operator render`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Manifest files (multi-document YAML) with Projects, Datasets, Workspaces.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
}

pub fn main(_args: Args) -> std::process::ExitCode {
    eprintln!("noexit-operator render: not built yet");
    std::process::ExitCode::FAILURE
}
