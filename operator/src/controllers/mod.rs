//! Controllers: one directory per kind, each `validate` (pure) → `build` (pure) → `apply` →
//! `status`. The pure halves are also what `noexit-operator render` prints.

pub mod children;
pub mod dataset;
pub mod invalid;
pub mod project;
pub mod quantity;
pub mod site;
#[cfg(test)]
pub mod testdata;
pub mod workspace;
pub mod workspace_request;

pub use children::Child;
pub use invalid::{Invalid, Reason};
pub use site::Site;

/// Arguments of `noexit-operator controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("noexit-operator controller: not built yet")
}
