//! (placeholder; see the issue that builds this module)

/// Arguments of `noexit-operator webhook`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("noexit-operator webhook: not built yet")
}
