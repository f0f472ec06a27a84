//! (placeholder; see the issue that builds this module)

/// Arguments of `noexit-operator mirror`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("noexit-operator mirror: not built yet")
}
