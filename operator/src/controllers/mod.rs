//! Controllers: one directory per kind, each `validate` (pure) → `build` (pure) → `apply` →
//! `status`.

/// Arguments of `noexit-operator controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("noexit-operator controller: not built yet")
}
