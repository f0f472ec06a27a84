//! (placeholder; see the issue that builds this module)

/// Arguments of `noexit-operator api`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("noexit-operator api: not built yet")
}
