//! What a Dataset must satisfy before any project may mount it.

use kube::ResourceExt;
use noexit_crds::Dataset;
use noexit_crds::names::{MAX_PROJECT_NAME, check_dns1123_label};

use crate::invalid::{Invalid, Reason, describe};
use crate::quantity;

pub fn validate(dataset: &Dataset) -> Result<(), Invalid> {
    let name = dataset.name_any();
    let object = describe("dataset", None, &name);
    let bad = |field: &str, message: String| Invalid::new(object.clone(), field, Reason::DatasetInvalid, message);
    check_dns1123_label(&name, 40).map_err(|m| bad("metadata.name", m))?;

    let src = &dataset.spec.source;
    let kinds = [src.nfs.is_some(), src.csi.is_some(), src.host_path.is_some()].iter().filter(|x| **x).count();
    if kinds != 1 {
        return Err(bad("spec.source", format!("must set exactly one of nfs, csi, hostPath (has {kinds})")));
    }
    let absolute = |p: &str| p.starts_with('/') && !p.split('/').any(|part| part == "..");
    if let Some(nfs) = &src.nfs {
        if nfs.server.trim().is_empty() {
            return Err(bad("spec.source.nfs.server", "must name the NFS server".into()));
        }
        if !absolute(&nfs.path) {
            return Err(bad("spec.source.nfs.path", format!("{:?} must be an absolute path without '..'", nfs.path)));
        }
    }
    if let Some(csi) = &src.csi {
        if check_dns1123_subdomain(&csi.driver).is_err() {
            return Err(bad("spec.source.csi.driver", format!("{:?} is not a CSI driver name", csi.driver)));
        }
        if csi.volume_handle.trim().is_empty() {
            return Err(bad("spec.source.csi.volumeHandle", "must not be empty".into()));
        }
    }
    if let Some(host) = &src.host_path
        && (!absolute(&host.path) || host.path == "/")
    {
        return Err(bad(
            "spec.source.hostPath.path",
            format!("{:?} must be an absolute directory other than /, without '..'", host.path),
        ));
    }
    if !quantity::is_valid(&dataset.spec.size.0) {
        return Err(bad("spec.size", format!("{:?} is not a quantity", dataset.spec.size.0)));
    }
    if let Some(digest) = &dataset.spec.digest {
        let ok = digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        if !ok {
            return Err(bad("spec.digest", format!("{digest:?} must be sha256:<64 lower-case hex digits>")));
        }
    }
    for (i, project) in dataset.spec.granted_to.iter().enumerate() {
        check_dns1123_label(project, MAX_PROJECT_NAME).map_err(|m| bad(&format!("spec.grantedTo[{i}]"), m))?;
    }
    Ok(())
}

fn check_dns1123_subdomain(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 253 {
        return Err("length".into());
    }
    value.split('.').try_for_each(|label| check_dns1123_label(label, 63))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case = (fn(&mut Dataset), &'static str);
    use crate::testdata;
    use noexit_crds::dataset::{HostPathSource, NfsSource};

    #[test]
    fn examples_are_valid() {
        for d in testdata::datasets() {
            validate(&d).expect("valid");
        }
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: Vec<Case> = vec![
            (
                |d| d.spec.source.host_path = Some(HostPathSource { path: "/data".into() }),
                "dataset icu-2019: spec.source: must set exactly one of nfs, csi, hostPath (has 2)",
            ),
            (|d| d.spec.source.nfs = None, "spec.source: must set exactly one"),
            (
                |d| d.spec.source.nfs = Some(NfsSource { server: "nfs".into(), path: "exports/x".into() }),
                "spec.source.nfs.path",
            ),
            (
                |d| d.spec.source.nfs = Some(NfsSource { server: "nfs".into(), path: "/exports/../etc".into() }),
                "spec.source.nfs.path",
            ),
            (|d| d.spec.size.0 = "lots".into(), "spec.size"),
            (|d| d.spec.digest = Some("md5:abc".into()), "spec.digest"),
            (|d| d.spec.granted_to.push("Ward 9".into()), "spec.grantedTo[1]"),
        ];
        for (mutate, expected) in cases {
            let mut d = testdata::datasets().remove(0);
            mutate(&mut d);
            let err = validate(&d).expect_err(expected).to_string();
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
    }
}
