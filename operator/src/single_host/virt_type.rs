//! KVM or TCG. `auto` tries to create a KVM VM in a child process and falls back to TCG when
//! that fails or hangs (as on some nested hosts); the choice and the reason are recorded and
//! shown by `status`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use noexit_host::model::VirtType;

/// Hidden subcommand the probe runs in a child process.
pub const PROBE_ARG: &str = "kvm-probe";

/// The virtualisation type for `requested` (`auto`, `kvm`, `qemu`/`tcg`), and why.
pub fn decide(requested: &str) -> anyhow::Result<(VirtType, String)> {
    if requested != "auto" {
        let t = VirtType::parse(requested)
            .ok_or_else(|| anyhow::anyhow!("--virt-type {requested:?}: expected auto, kvm or qemu"))?;
        return Ok((t, format!("set by --virt-type / NOEXIT_VIRT_TYPE={requested}")));
    }
    match probe(Duration::from_secs(5)) {
        Ok(()) => Ok((VirtType::Kvm, "/dev/kvm created a VM".into())),
        Err(why) => Ok((VirtType::Qemu, format!("TCG emulation: {why}"))),
    }
}

fn probe(limit: Duration) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg(PROBE_ARG)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the KVM probe: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(_)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(err.trim().to_owned());
            }
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                return Err(format!("creating a KVM VM did not finish within {} s", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Why this host's KVM cannot run the images' guests although /dev/kvm works: the paravirtual
/// `kvm_pvm` module (some nested cloud hosts) creates VMs but runs only guest kernels built for
/// PVM; Debian's kernel is not, and libvirt's QEMU hangs with it.
pub fn unusable_kvm_flavour(module_loaded: impl Fn(&str) -> bool) -> Option<String> {
    (module_loaded("kvm_pvm") && !module_loaded("kvm_intel") && !module_loaded("kvm_amd")).then(|| {
        "/dev/kvm is kvm-pvm (paravirtual KVM), which runs only PVM-enabled guest kernels, not the images' Debian kernel".into()
    })
}

/// The probe itself: open /dev/kvm, check the API version, create (and drop) a VM.
pub fn run_probe() -> std::process::ExitCode {
    use std::os::fd::AsRawFd;
    if let Some(why) = unusable_kvm_flavour(|m| std::path::Path::new("/sys/module").join(m).exists()) {
        eprintln!("{why}");
        return std::process::ExitCode::FAILURE;
    }
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    let kvm = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("/dev/kvm: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // SAFETY: ioctls without pointer arguments on a descriptor we own.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != 12 {
        eprintln!("/dev/kvm: API version {version}, expected 12");
        return std::process::ExitCode::FAILURE;
    }
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        eprintln!("/dev/kvm: cannot create a VM: {}", std::io::Error::last_os_error());
        return std::process::ExitCode::FAILURE;
    }
    unsafe { libc::close(vm) };
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_kvm_is_not_used() {
        let loaded = |mods: &'static [&'static str]| move |m: &str| mods.contains(&m);
        assert!(unusable_kvm_flavour(loaded(&["kvm", "kvm_pvm"])).unwrap().contains("kvm-pvm"));
        assert_eq!(unusable_kvm_flavour(loaded(&["kvm", "kvm_intel"])), None);
        assert_eq!(unusable_kvm_flavour(loaded(&["kvm", "kvm_amd", "kvm_pvm"])), None);
    }

    #[test]
    fn explicit_choice_and_bad_value() {
        assert_eq!(decide("qemu").unwrap().0, VirtType::Qemu);
        assert_eq!(decide("kvm").unwrap().0, VirtType::Kvm);
        assert!(decide("xen").unwrap_err().to_string().contains("expected auto, kvm or qemu"));
    }
}
