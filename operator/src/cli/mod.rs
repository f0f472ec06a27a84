//! (placeholder; see the issue that builds this module)

pub mod audit;

/// Arguments of `noexit-operator cli`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("noexit-operator cli: not built yet")
}

/// Entry point of the `noexit` binary.
pub fn main() -> std::process::ExitCode {
    eprintln!("noexit: not built yet");
    std::process::ExitCode::from(2)
}
