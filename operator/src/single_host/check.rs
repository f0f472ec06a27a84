//! Which manifests single-host mode can run, checked with the same pure validators as the
//! operator and its webhook, plus what only this mode needs: a `vm` runtime, an image that is a
//! host path, datasets that are host files. Pure: the filesystem is behind [`Files`].
//!
//! Conventions of single-host mode (docs/admin.md):
//! - `Workspace.spec.image` is an absolute host path, one of
//!   - a directory holding `vmlinuz` and `initrd.img`: direct kernel boot, the root file system
//!     is the initramfs (the tiny test image);
//!   - the same directory with a root disk beside them, `root.qcow2` or `workspace.qcow2` (the
//!     name `images/vm/build.sh workspace` gives it; both at once is refused as ambiguous):
//!     direct kernel boot of a copy-on-write overlay of that disk, per workspace (the workspace
//!     image has no boot loader);
//!   - a `.qcow2` disk image with its own boot loader (a copy-on-write overlay per workspace).
//!
//!   In a directory an optional `cmdline` file gives the kernel command line; without one it is
//!   [`DEFAULT_CMDLINE`], or [`DEFAULT_ROOT_CMDLINE`] with a root disk.
//! - `Dataset.spec.source.hostPath.path` names a disk image file on the host (raw, or qcow2 by
//!   its `.qcow2` extension), attached read-only with serial `ds-<name>`. `nfs` and `csi`
//!   sources are Kubernetes-only and refused here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use noexit_crds::workspace::Runtime;
use noexit_crds::{Dataset, Project, Workspace};
use noexit_host::model::{Boot, DatasetDisk};

use crate::controllers::images::ImageAllowlist;
use crate::controllers::invalid::describe;
use crate::controllers::{dataset, project, quantity, workspace};
use crate::manifests::Manifest;

/// Namespace the control plane would run in on Kubernetes (no project may take its name).
pub const OPERATOR_NAMESPACE: &str = "noexit-system";
/// Kernel command line when the image directory has no `cmdline` file (and no root disk).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// Kernel command line when the image directory has a root disk and no `cmdline` file: the
/// workspace image's (images/README.md), its root file system found by label.
pub const DEFAULT_ROOT_CMDLINE: &str = "console=ttyS0 root=LABEL=noexit-root ro";
/// Names a root disk may have in an image directory, in the order looked for.
pub const ROOT_DISK_NAMES: [&str; 2] = ["root.qcow2", "workspace.qcow2"];

/// What a path is, as far as the checks care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Missing,
    File,
    Dir,
}

/// The filesystem, read-only.
pub trait Files {
    fn kind(&self, path: &Path) -> FileKind;
    fn read(&self, path: &Path) -> Option<String>;
}

/// The real filesystem.
pub struct HostFiles;

impl Files for HostFiles {
    fn kind(&self, path: &Path) -> FileKind {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => FileKind::Dir,
            Ok(_) => FileKind::File,
            Err(_) => FileKind::Missing,
        }
    }

    fn read(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }
}

/// A workspace that may run, with what its domain is made of.
#[derive(Clone, Debug)]
pub struct RunnableWorkspace {
    pub workspace: Workspace,
    pub project: String,
    pub name: String,
    pub boot: ImageBoot,
    pub datasets: Vec<DatasetDisk>,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub home_bytes: u64,
    pub mirror: bool,
    pub running: bool,
}

/// How the image boots (the overlay path is per workspace, chosen later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageBoot {
    /// `root`: the image's root disk, which each workspace boots an overlay of.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
        root: Option<PathBuf>,
    },
    Disk {
        base: PathBuf,
    },
}

impl ImageBoot {
    pub fn boot(&self, overlay: PathBuf) -> Boot {
        match self {
            Self::Kernel { kernel, initrd, cmdline, root } => Boot::Kernel {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
                root: root.as_ref().map(|_| overlay),
            },
            Self::Disk { .. } => Boot::Disk { overlay },
        }
    }

    /// The disk image each workspace gets a copy-on-write overlay of, if any.
    pub fn base_disk(&self) -> Option<&PathBuf> {
        match self {
            Self::Kernel { root, .. } => root.as_ref(),
            Self::Disk { base } => Some(base),
        }
    }

    /// Test images open a shell on the second serial port (`noexit.test=1`).
    pub fn test_console(&self) -> bool {
        matches!(self, Self::Kernel { cmdline, .. } if cmdline.split_whitespace().any(|w| w == "noexit.test=1"))
    }
}

/// Everything that may run.
#[derive(Clone, Debug, Default)]
pub struct Checked {
    pub projects: Vec<Project>,
    pub datasets: Vec<Dataset>,
    pub workspaces: Vec<RunnableWorkspace>,
}

/// Check every manifest. Any problem refuses the whole set (listing every problem): a
/// half-applied set could start a workspace without the project wall it was meant to have.
pub fn check(manifests: &[Manifest], files: &dyn Files, now: DateTime<Utc>) -> Result<Checked, Vec<String>> {
    let mut problems = Vec::new();
    let mut projects = BTreeMap::new();
    let mut datasets = BTreeMap::new();
    let mut workspaces = Vec::new();
    for m in manifests {
        match m {
            Manifest::Project(p) => {
                if projects.insert(p.name_any(), (**p).clone()).is_some() {
                    problems.push(format!("project {}: defined twice", p.name_any()));
                }
            }
            Manifest::Dataset(d) => {
                if datasets.insert(d.name_any(), (**d).clone()).is_some() {
                    problems.push(format!("dataset {}: defined twice", d.name_any()));
                }
            }
            Manifest::Workspace(w) => workspaces.push((**w).clone()),
            Manifest::WorkspaceRequest(r) => problems.push(format!(
                "{}: WorkspaceRequests are made through the API (`noexit request`), not applied in single-host mode",
                describe("workspacerequest", r.namespace().as_deref(), &r.name_any())
            )),
        }
    }
    let all_datasets: Vec<Dataset> = datasets.values().cloned().collect();
    let mut disks = BTreeMap::new();
    for d in datasets.values() {
        if let Err(e) = dataset::validate::validate(d) {
            problems.push(e.to_string());
            continue;
        }
        let object = describe("dataset", None, &d.name_any());
        let Some(host) = &d.spec.source.host_path else {
            problems.push(format!(
                "{object}: spec.source: single-host mode attaches datasets from host files only; set spec.source.hostPath.path to a disk image file (nfs and csi are for Kubernetes)"
            ));
            continue;
        };
        let path = PathBuf::from(&host.path);
        match files.kind(&path) {
            FileKind::File => {}
            FileKind::Dir => {
                problems.push(format!("{object}: spec.source.hostPath.path: {} is a directory; single-host mode needs a disk image file (raw or .qcow2)", path.display()));
                continue;
            }
            FileKind::Missing => {
                problems.push(format!("{object}: spec.source.hostPath.path: {} does not exist", path.display()));
                continue;
            }
        }
        let format = if path.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
        disks.insert(d.name_any(), DatasetDisk { name: d.name_any(), path, format: format.into() });
    }
    let today = now.date_naive();
    for p in projects.values() {
        if let Err(e) = project::validate::validate(p, &all_datasets, OPERATOR_NAMESPACE, today) {
            problems.push(e.to_string());
        }
    }
    let mut runnable = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for ws in &workspaces {
        let object = describe("workspace", ws.namespace().as_deref(), &ws.name_any());
        if !seen.insert((ws.spec.project.clone(), ws.name_any())) {
            problems.push(format!("{object}: defined twice"));
            continue;
        }
        let resolved = workspace::validate::validate(
            ws,
            projects.get(&ws.spec.project),
            &all_datasets,
            &ImageAllowlist::default(),
            now,
        );
        problems.extend(resolved.problems.iter().map(ToString::to_string));
        if ws.spec.runtime == Runtime::Pod {
            problems.push(format!(
                "{object}: spec.runtime: `pod` workspaces need Kubernetes; single-host mode runs `vm` workspaces only (set runtime: vm and an image path, or use the operator on a cluster)"
            ));
            continue;
        }
        let boot = match image(&ws.spec.image, files) {
            Ok(b) => b,
            Err(m) => {
                problems.push(format!("{object}: spec.image: {m}"));
                continue;
            }
        };
        let res = &ws.spec.resources;
        let memory = quantity::bytes(&res.memory.0);
        let home = quantity::bytes(&res.home_size.0);
        let (Some(memory), Some(home)) = (memory, home) else {
            problems.push(format!(
                "{object}: spec.resources: memory and homeSize must be byte quantities (e.g. 512Mi, 20Gi)"
            ));
            continue;
        };
        let ds: Vec<DatasetDisk> = resolved.datasets.iter().filter_map(|d| disks.get(d).cloned()).collect();
        runnable.push(RunnableWorkspace {
            project: ws.spec.project.clone(),
            name: ws.name_any(),
            boot,
            datasets: ds,
            memory_mib: memory.div_ceil(1 << 20).max(64),
            vcpus: quantity::cpu_cores(&res.cpu.0),
            home_bytes: home,
            mirror: resolved.mirror,
            running: ws.spec.lifecycle.running && !resolved.expired,
            workspace: ws.clone(),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Checked { projects: projects.into_values().collect(), datasets: all_datasets, workspaces: runnable })
}

fn image(image: &str, files: &dyn Files) -> Result<ImageBoot, String> {
    let path = PathBuf::from(image);
    if !path.is_absolute() {
        return Err(format!(
            "{image:?}: in single-host mode the image is an absolute host path (a directory with vmlinuz and initrd.img, and root.qcow2 or workspace.qcow2 if the root is on a disk; or a .qcow2 file with a boot loader)"
        ));
    }
    match files.kind(&path) {
        FileKind::Missing => Err(format!("{} does not exist", path.display())),
        FileKind::File if path.extension().is_some_and(|e| e == "qcow2") => Ok(ImageBoot::Disk { base: path }),
        FileKind::File => Err(format!("{} is a file but not a .qcow2 disk image", path.display())),
        FileKind::Dir => {
            let kernel = path.join("vmlinuz");
            let initrd = path.join("initrd.img");
            for f in [&kernel, &initrd] {
                if files.kind(f) != FileKind::File {
                    return Err(format!(
                        "{} has no {} (build it with images/vm/build.sh)",
                        path.display(),
                        f.file_name().and_then(|n| n.to_str()).unwrap_or("?")
                    ));
                }
            }
            let roots: Vec<PathBuf> =
                ROOT_DISK_NAMES.iter().map(|n| path.join(n)).filter(|p| files.kind(p) == FileKind::File).collect();
            if roots.len() > 1 {
                return Err(format!(
                    "{} has both {} and {}: keep one root disk (which one boots would be a guess)",
                    path.display(),
                    ROOT_DISK_NAMES[0],
                    ROOT_DISK_NAMES[1]
                ));
            }
            let root = roots.into_iter().next();
            let default = if root.is_some() { DEFAULT_ROOT_CMDLINE } else { DEFAULT_CMDLINE };
            let cmdline = files.read(&path.join("cmdline")).map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
            Ok(ImageBoot::Kernel { kernel, initrd, cmdline: cmdline.unwrap_or_else(|| default.into()), root })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::manifests::parse_documents;

    #[derive(Default)]
    pub(crate) struct FakeFiles(pub BTreeMap<PathBuf, Option<String>>);

    impl Files for FakeFiles {
        fn kind(&self, path: &Path) -> FileKind {
            match self.0.get(path) {
                Some(Some(_)) => FileKind::File,
                Some(None) => FileKind::Dir,
                None => FileKind::Missing,
            }
        }
        fn read(&self, path: &Path) -> Option<String> {
            self.0.get(path).cloned().flatten()
        }
    }

    pub(crate) fn files() -> FakeFiles {
        let mut f = FakeFiles::default();
        f.0.insert("/img/tiny".into(), None);
        f.0.insert("/img/tiny/vmlinuz".into(), Some(String::new()));
        f.0.insert("/img/tiny/initrd.img".into(), Some(String::new()));
        f.0.insert("/img/tiny/cmdline".into(), Some("console=ttyS0 noexit.test=1\n".into()));
        f.0.insert("/data/icu.img".into(), Some(String::new()));
        f
    }

    pub(crate) const MANIFESTS: &str = r#"
apiVersion: noexit.io/v1alpha1
kind: Project
metadata: {name: ward-7}
spec:
  displayName: Ward 7
  members: [{user: alice@x, roles: [researcher, admin]}]
  approval: {reference: REC-1, expires: "2099-01-01"}
  datasets: [icu]
---
apiVersion: noexit.io/v1alpha1
kind: Dataset
metadata: {name: icu}
spec:
  classification: Synthetic
  source: {hostPath: {path: /data/icu.img}}
  size: 1Gi
  grantedTo: [ward-7]
---
apiVersion: noexit.io/v1alpha1
kind: Workspace
metadata: {name: alice-vm, namespace: noexit-ward-7}
spec:
  project: ward-7
  owner: alice@x
  runtime: vm
  image: /img/tiny
  resources: {cpu: "1", memory: 256Mi, homeSize: 64Mi}
  datasets: [icu]
"#;

    fn run(text: &str) -> Result<Checked, Vec<String>> {
        check(&parse_documents(text).unwrap(), &files(), Utc::now())
    }

    #[test]
    fn a_vm_workspace_with_a_kernel_image_and_a_dataset_file() {
        let c = run(MANIFESTS).unwrap();
        let w = &c.workspaces[0];
        assert_eq!(w.memory_mib, 256);
        assert_eq!(w.datasets[0].path, Path::new("/data/icu.img"));
        assert!(w.boot.test_console());
    }

    /// The runnable example (examples/single-host/, put in place and run by hack/up.sh): it must
    /// pass `up`'s checks with the files the script makes, and name each of them.
    const EXAMPLE: &str = include_str!("../../../examples/single-host/ward-7.yaml");
    const UP_SCRIPT: &str = include_str!("../../../hack/up.sh");

    fn example_files() -> FakeFiles {
        let mut f = FakeFiles::default();
        let img = "/var/lib/noexit/images/tiny";
        f.0.insert(img.into(), None);
        f.0.insert(format!("{img}/vmlinuz").into(), Some(String::new()));
        f.0.insert(format!("{img}/initrd.img").into(), Some(String::new()));
        f.0.insert(format!("{img}/cmdline").into(), Some("console=ttyS0 quiet\n".into()));
        for ds in ["icu-2019", "cohort-2024"] {
            f.0.insert(format!("/var/lib/noexit/datasets/{ds}.img").into(), Some(String::new()));
        }
        f
    }

    #[test]
    fn the_single_host_example_passes_ups_checks() {
        let manifests = parse_documents(EXAMPLE).unwrap();
        let c = check(&manifests, &example_files(), Utc::now()).unwrap();
        let ws: Vec<_> = c.workspaces.iter().map(|w| (w.name.as_str(), w.running, w.datasets.len())).collect();
        assert_eq!(ws, [("alice-vm", true, 2), ("dave-vm", false, 1)]);
        assert!(!c.workspaces[0].boot.test_console(), "the example must not open the test image's root shell");
        assert_eq!(c.datasets.len(), 2);
        // Without the files the script makes, `up` refuses, naming each.
        let e = check(&manifests, &FakeFiles::default(), Utc::now()).unwrap_err();
        assert!(
            e.contains(
                &"dataset icu-2019: spec.source.hostPath.path: /var/lib/noexit/datasets/icu-2019.img does not exist"
                    .to_owned()
            ),
            "{e:?}"
        );
        assert!(
            e.contains(&"workspace ward-7/alice-vm: spec.image: /var/lib/noexit/images/tiny does not exist".to_owned()),
            "{e:?}"
        );
        // hack/up.sh makes exactly the paths the example names.
        for path in ["/var/lib/noexit/images", "/var/lib/noexit/datasets", "icu-2019", "cohort-2024"] {
            assert!(UP_SCRIPT.contains(path), "hack/up.sh does not make {path}");
        }
        assert!(UP_SCRIPT.contains("examples/single-host/ward-7.yaml"));
    }

    /// The three image forms, and the default command line of each.
    #[test]
    fn image_forms() {
        let mut f = files();
        let ws = "/img/ws";
        f.0.insert(ws.into(), None);
        for n in ["vmlinuz", "initrd.img", "workspace.qcow2"] {
            f.0.insert(format!("{ws}/{n}").into(), Some(String::new()));
        }
        f.0.insert("/img/disk.qcow2".into(), Some(String::new()));
        let kernel = |root: Option<&str>, cmdline: &str| ImageBoot::Kernel {
            kernel: format!("{ws}/vmlinuz").into(),
            initrd: format!("{ws}/initrd.img").into(),
            cmdline: cmdline.into(),
            root: root.map(PathBuf::from),
        };
        // A root disk beside the kernel: booted by the kernel, root found by label.
        let b = image(ws, &f).unwrap();
        assert_eq!(b, kernel(Some("/img/ws/workspace.qcow2"), "console=ttyS0 root=LABEL=noexit-root ro"));
        assert_eq!(b.base_disk(), Some(&PathBuf::from("/img/ws/workspace.qcow2")));
        let overlay = PathBuf::from("/state/ws/root.qcow2");
        assert_eq!(
            b.boot(overlay.clone()),
            Boot::Kernel {
                kernel: "/img/ws/vmlinuz".into(),
                initrd: "/img/ws/initrd.img".into(),
                cmdline: "console=ttyS0 root=LABEL=noexit-root ro".into(),
                root: Some(overlay.clone()),
            }
        );
        assert!(!b.test_console());
        // A `cmdline` file still wins.
        f.0.insert(format!("{ws}/cmdline").into(), Some("console=ttyS0 root=/dev/vda rw\n".into()));
        assert_eq!(image(ws, &f).unwrap(), kernel(Some("/img/ws/workspace.qcow2"), "console=ttyS0 root=/dev/vda rw"));
        // Two root disks: refused, naming both.
        f.0.insert(format!("{ws}/root.qcow2").into(), Some(String::new()));
        let e = image(ws, &f).unwrap_err();
        assert!(e.contains("has both root.qcow2 and workspace.qcow2"), "{e}");
        // Without a root disk: the initramfs is the root, no overlay.
        f.0.remove(Path::new("/img/ws/root.qcow2"));
        f.0.remove(Path::new("/img/ws/workspace.qcow2"));
        f.0.remove(Path::new("/img/ws/cmdline"));
        let b = image(ws, &f).unwrap();
        assert_eq!(b, kernel(None, "console=ttyS0"));
        assert_eq!(b.base_disk(), None);
        assert!(matches!(b.boot(overlay.clone()), Boot::Kernel { root: None, .. }));
        // A disk with its own boot loader.
        let b = image("/img/disk.qcow2", &f).unwrap();
        assert_eq!(b.base_disk(), Some(&PathBuf::from("/img/disk.qcow2")));
        assert_eq!(b.boot(overlay.clone()), Boot::Disk { overlay });
    }

    /// `IMAGE=workspace hack/up.sh` runs a copy of the example with the workspace image and 1Gi
    /// per workspace (its sed): that copy must pass too, booting kernel + root disk.
    #[test]
    fn the_workspace_image_copy_of_the_example_passes_ups_checks() {
        assert!(UP_SCRIPT.contains("s#image: $images/tiny#image: $dest#"), "hack/up.sh no longer rewrites the image");
        assert!(UP_SCRIPT.contains("s#memory: 256Mi#memory: 1Gi#"), "hack/up.sh no longer rewrites the memory");
        let img = "/var/lib/noexit/images/workspace-a84704d78d5d410f";
        let text = EXAMPLE
            .replace("image: /var/lib/noexit/images/tiny", &format!("image: {img}"))
            .replace("memory: 256Mi", "memory: 1Gi");
        let mut f = example_files();
        f.0.insert(img.into(), None);
        for n in ["vmlinuz", "initrd.img", "workspace.qcow2"] {
            f.0.insert(format!("{img}/{n}").into(), Some(String::new()));
        }
        let c = check(&parse_documents(&text).unwrap(), &f, Utc::now()).unwrap();
        let w = &c.workspaces[0];
        assert_eq!(w.memory_mib, 1024);
        assert_eq!(w.boot.base_disk(), Some(&PathBuf::from(format!("{img}/workspace.qcow2"))));
        assert!(
            matches!(&w.boot, ImageBoot::Kernel { cmdline, .. } if cmdline == DEFAULT_ROOT_CMDLINE),
            "{:?}",
            w.boot
        );
    }

    #[test]
    fn refusals_name_the_object_and_field() {
        let e = run(&MANIFESTS.replace("runtime: vm", "runtime: pod")).unwrap_err();
        assert!(e[0].starts_with("workspace ward-7/alice-vm: spec.runtime: `pod` workspaces need Kubernetes"), "{e:?}");
        let e = run(&MANIFESTS.replace("image: /img/tiny", "image: /img/missing")).unwrap_err();
        assert_eq!(e, vec!["workspace ward-7/alice-vm: spec.image: /img/missing does not exist"]);
        let e = run(&MANIFESTS.replace("/data/icu.img", "/data/gone.img")).unwrap_err();
        assert_eq!(e, vec!["dataset icu: spec.source.hostPath.path: /data/gone.img does not exist"]);
        let e =
            run(&MANIFESTS.replace("{hostPath: {path: /data/icu.img}}", "{nfs: {server: n, path: /x}}")).unwrap_err();
        assert!(e[0].contains("single-host mode attaches datasets from host files only"), "{e:?}");
        // The operator's own validators run too.
        let e = run(&MANIFESTS.replace("owner: alice@x", "owner: mallory@x")).unwrap_err();
        assert!(e.iter().any(|m| m.starts_with("workspace ward-7/alice-vm: spec.owner")), "{e:?}");
    }
}
