//! noexit-agent: runs inside a workspace (root in a VM, unprivileged in a pod).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("noexit-agent: not built yet")
}
