//! The site's allowlist of workspace images. A workspace image is what the researcher runs: for
//! a VM it is the guest, agent included, so an image of the researcher's choosing means an agent
//! (the inner wall, the outbox checks) under the researcher's control. When the site lists
//! images, a Workspace may name only those, and only by digest (`name@sha256:<64 hex>`): a tag
//! can be moved to other content after the check. One pure check, used by the controller and
//! the admission webhook alike.

use std::fmt;

use noexit_crds::workspace::Runtime;
use serde::{Deserialize, Serialize};

/// `workspaceImages` of the site file: per runtime, the image references (with digest) a
/// Workspace may use. Both empty: no restriction (a site that has not set it up yet). Once
/// either is set, a runtime with an empty list admits no image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ImageAllowlist {
    /// Container images for `runtime: pod`.
    pub pod: Vec<DigestRef>,
    /// VM disk images (KubeVirt containerDisk) for `runtime: vm`.
    pub vm: Vec<DigestRef>,
}

/// An image reference pinned by digest: `registry/path[:tag]@sha256:<64 lower-case hex>`. The
/// tag, if any, is ignored when comparing: the repository and the digest are the identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DigestRef {
    text: String,
    repository: String,
    digest: String,
}

impl DigestRef {
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some((name, digest)) = text.rsplit_once('@') else {
            return Err(format!("{text:?} has no digest (expected <image>@sha256:<64 hex digits>)"));
        };
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("{text:?}: the digest must be sha256:<64 lower-case hex digits>"));
        }
        let repository = strip_tag(name);
        if repository.is_empty() || repository.chars().any(|c| c.is_whitespace() || c == '@') {
            return Err(format!("{text:?}: no image name before the digest"));
        }
        Ok(Self { text: text.to_owned(), repository: repository.to_owned(), digest: digest.to_owned() })
    }

    /// Same repository and digest (tags ignored).
    pub fn same_image(&self, other: &DigestRef) -> bool {
        self.repository == other.repository && self.digest == other.digest
    }
}

/// `registry:5000/path:tag` → `registry:5000/path` (a `:` after the last `/` starts a tag).
fn strip_tag(name: &str) -> &str {
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[last_slash..].find(':') {
        Some(i) => &name[..last_slash + i],
        None => name,
    }
}

impl TryFrom<String> for DigestRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<DigestRef> for String {
    fn from(d: DigestRef) -> String {
        d.text
    }
}

impl fmt::Display for DigestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl ImageAllowlist {
    /// The site restricts images.
    pub fn is_set(&self) -> bool {
        !self.pod.is_empty() || !self.vm.is_empty()
    }

    fn list(&self, runtime: Runtime) -> &[DigestRef] {
        match runtime {
            Runtime::Pod => &self.pod,
            Runtime::Vm => &self.vm,
        }
    }

    /// `Ok` when `image` may run as `runtime`; otherwise why not (for a message naming the field).
    pub fn check(&self, runtime: Runtime, image: &str) -> Result<(), String> {
        if !self.is_set() {
            return Ok(());
        }
        let key = format!("workspaceImages.{}", runtime.as_str());
        let wanted = DigestRef::parse(image)
            .map_err(|e| format!("{e}; the site admits workspace images by digest only (site file {key})"))?;
        if self.list(runtime).iter().any(|allowed| allowed.same_image(&wanted)) {
            Ok(())
        } else {
            Err(format!(
                "{image:?} is not in the site's allowlist of {} images (site file {key}: {} entries)",
                runtime.as_str(),
                self.list(runtime).len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:e52fc2c04c00008eff4893909017748b11bc4f99d2b8a408a2b9fe5ac8f7e221";
    const D2: &str = "sha256:8c9b8224b35736c37b8a96644e9b4714b1b70177ccacf4d0752487b99ae1623c";

    fn list() -> ImageAllowlist {
        ImageAllowlist {
            pod: vec![DigestRef::parse(&format!("registry.example:5000/noexit/r-desktop:4.4@{D1}")).expect("ref")],
            vm: vec![DigestRef::parse(&format!("registry.example:5000/noexit/r-desktop-vm@{D2}")).expect("ref")],
        }
    }

    #[test]
    fn no_list_admits_anything() {
        assert!(ImageAllowlist::default().check(Runtime::Pod, "anything:latest").is_ok());
    }

    #[test]
    fn listed_digests_pass_whatever_the_tag() {
        let l = list();
        assert!(l.check(Runtime::Pod, &format!("registry.example:5000/noexit/r-desktop@{D1}")).is_ok());
        assert!(l.check(Runtime::Pod, &format!("registry.example:5000/noexit/r-desktop:other@{D1}")).is_ok());
        assert!(l.check(Runtime::Vm, &format!("registry.example:5000/noexit/r-desktop-vm:4.4@{D2}")).is_ok());
    }

    #[test]
    fn tags_other_digests_other_repositories_and_other_runtimes_are_refused() {
        let l = list();
        let tag = l.check(Runtime::Pod, "registry.example:5000/noexit/r-desktop:4.4").expect_err("tag");
        assert!(tag.contains("has no digest") && tag.contains("workspaceImages.pod"), "{tag}");
        let other = l.check(Runtime::Pod, &format!("registry.example:5000/noexit/r-desktop@{D2}")).expect_err("d");
        assert!(other.contains("not in the site's allowlist of pod images"), "{other}");
        // Same digest, another repository (a registry the researcher controls).
        assert!(l.check(Runtime::Pod, &format!("evil.example/noexit/r-desktop@{D1}")).is_err());
        // A pod image as a VM disk, and the other way round.
        assert!(l.check(Runtime::Vm, &format!("registry.example:5000/noexit/r-desktop@{D1}")).is_err());
        assert!(l.check(Runtime::Pod, &format!("registry.example:5000/noexit/r-desktop-vm@{D2}")).is_err());
        // A digest of the wrong form.
        assert!(l.check(Runtime::Pod, "registry.example:5000/noexit/r-desktop@sha256:E52F").is_err());
        assert!(l.check(Runtime::Pod, &format!("registry.example:5000/noexit/r-desktop@md5:{}", &D1[7..])).is_err());
    }

    #[test]
    fn a_site_file_with_a_tag_in_the_list_does_not_load() {
        let ok: ImageAllowlist =
            serde_yaml::from_str(&format!("pod: [\"r@{D1}\"]\n")).expect("a digest reference parses");
        assert_eq!(ok.pod[0].to_string(), format!("r@{D1}"));
        let err = serde_yaml::from_str::<ImageAllowlist>("pod: [\"r:4.4\"]\n").expect_err("a tag");
        assert!(err.to_string().contains("has no digest"), "{err}");
        assert!(serde_yaml::from_str::<ImageAllowlist>("pods: []\n").is_err());
    }

    #[test]
    fn tags_are_told_from_registry_ports() {
        assert_eq!(strip_tag("registry:5000/a/b:1.2"), "registry:5000/a/b");
        assert_eq!(strip_tag("registry:5000/a/b"), "registry:5000/a/b");
        assert_eq!(strip_tag("b:1"), "b");
    }
}
