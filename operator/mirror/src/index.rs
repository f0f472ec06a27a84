//! The package index (`src/contrib/PACKAGES`): what exists, at which version, with which
//! checksum; and the three files R reads, rendered for one project's view of it.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

use super::dcf::{self, Record};
use super::policy::{self, ProjectPolicy};

/// One package in the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub version: String,
    /// Lower-case hex digests, when the index carries them.
    pub md5: Option<String>,
    pub sha256: Option<String>,
    pub record: Record,
}

impl Entry {
    /// File name of the source tarball.
    pub fn tarball(&self) -> String {
        format!("{}_{}.tar.gz", self.name, self.version)
    }

    /// Packages this one needs at install or load time (Depends, Imports, LinkingTo), without
    /// version constraints, without `R` itself.
    pub fn hard_dependencies(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for field in ["Depends", "Imports", "LinkingTo"] {
            if let Some(value) = dcf::get(&self.record, field) {
                for item in value.split(',') {
                    let name = item.split('(').next().unwrap_or_default().trim();
                    if !name.is_empty() && name != "R" {
                        out.insert(name.to_owned());
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("PACKAGES is not valid DCF: {0}")]
    Dcf(#[from] dcf::DcfError),
    #[error("PACKAGES record {record}: missing field {field}")]
    Missing { record: usize, field: &'static str },
    #[error("PACKAGES record {record} ({name}): {problem}")]
    Invalid { record: usize, name: String, problem: String },
}

/// A parsed index. Entries keep upstream order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    pub entries: Vec<Entry>,
}

/// Longest package name accepted (CRAN's longest is far shorter).
pub const MAX_NAME: usize = 64;
/// Longest version accepted (CRAN's are like `1.15.4`, `0.8.0-1`, `2023.10.12`).
pub const MAX_VERSION: usize = 32;

pub(crate) fn valid_name(name: &str) -> bool {
    // CRAN: letters, digits and dots, starting with a letter, not ending with a dot.
    (2..=MAX_NAME).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.ends_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
}

/// R's package version form: numbers joined by single `.` or `-`, at most [`MAX_VERSION`]
/// characters.
pub(crate) fn valid_version(version: &str) -> bool {
    version.len() <= MAX_VERSION
        && !version.is_empty()
        && version.split(['.', '-']).all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

fn hex_digest(value: Option<&str>, len: usize) -> Option<Result<String, String>> {
    value.map(|v| {
        let v = v.trim().to_ascii_lowercase();
        if v.len() == len && v.chars().all(|c| c.is_ascii_hexdigit()) { Ok(v) } else { Err(v) }
    })
}

impl Index {
    /// Parse `PACKAGES` text. Names and versions are checked because they become file paths.
    pub fn parse(text: &str) -> Result<Self, IndexError> {
        let mut entries = Vec::new();
        for (i, record) in dcf::parse(text)?.into_iter().enumerate() {
            let n = i + 1;
            let name = dcf::get(&record, "Package").ok_or(IndexError::Missing { record: n, field: "Package" })?;
            let version = dcf::get(&record, "Version").ok_or(IndexError::Missing { record: n, field: "Version" })?;
            let invalid = |problem: String| IndexError::Invalid { record: n, name: name.to_owned(), problem };
            if !valid_name(name) {
                return Err(invalid("not a valid package name".into()));
            }
            if !valid_version(version) {
                return Err(invalid(format!("version {version:?} is not a valid version")));
            }
            let md5 = hex_digest(dcf::get(&record, "MD5sum"), 32)
                .transpose()
                .map_err(|v| invalid(format!("MD5sum {v:?} is not 32 hex digits")))?;
            let sha256 = hex_digest(dcf::get(&record, "SHA256sum"), 64)
                .transpose()
                .map_err(|v| invalid(format!("SHA256sum {v:?} is not 64 hex digits")))?;
            entries.push(Entry { name: name.to_owned(), version: version.to_owned(), md5, sha256, record });
        }
        Ok(Self { entries })
    }

    /// Entry of `name` at exactly `version`.
    pub fn find(&self, name: &str, version: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name && e.version == version)
    }

    /// Entries of this index, then those of `other` whose name this one lacks.
    pub fn merged_with(mut self, other: &Index) -> Index {
        let names: BTreeSet<String> = self.entries.iter().map(|e| e.name.clone()).collect();
        self.entries.extend(other.entries.iter().filter(|e| !names.contains(&e.name)).cloned());
        self
    }

    /// What a project may install: entries the policy allows.
    pub fn filtered(&self, policy: Option<&ProjectPolicy>) -> Index {
        let entries =
            self.entries.iter().filter(|e| policy::decide(policy, &e.name, &e.version).is_ok()).cloned().collect();
        Index { entries }
    }

    /// `PACKAGES` text.
    pub fn to_dcf(&self) -> String {
        let mut out = String::new();
        for e in &self.entries {
            dcf::write_record(&mut out, &e.record);
        }
        out
    }

    /// `PACKAGES.rds` contents before compression: one row per entry, one column per field
    /// that any entry has (first-seen order), NA where an entry lacks it.
    pub fn to_rds(&self) -> Vec<u8> {
        let mut columns: Vec<&str> = Vec::new();
        for e in &self.entries {
            for (field, _) in &e.record {
                if !columns.contains(&field.as_str()) {
                    columns.push(field);
                }
            }
        }
        let rows: Vec<Vec<Option<&str>>> =
            self.entries.iter().map(|e| columns.iter().map(|c| dcf::get(&e.record, c)).collect()).collect();
        super::rds::character_matrix(&columns, &rows)
    }
}

/// The three index files one project sees, rendered once per (index, policy) generation.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub packages: bytes::Bytes,
    pub packages_gz: bytes::Bytes,
    pub packages_rds: bytes::Bytes,
    /// Strong validator shared by the three files (they change together).
    pub etag_base: String,
    pub last_modified: std::time::SystemTime,
}

impl Rendered {
    pub fn new(index: &Index, last_modified: std::time::SystemTime) -> Self {
        let text = index.to_dcf();
        let etag_base = hex::encode(&Sha256::digest(text.as_bytes())[..12]);
        Self {
            packages_gz: super::rds::gzip(text.as_bytes()).into(),
            packages_rds: super::rds::gzip(&index.to_rds()).into(),
            packages: text.into(),
            etag_base,
            last_modified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_crds::project::{MirrorPolicy, PackageRule};

    #[test]
    fn versions_and_names_are_bounded_in_length_and_form() {
        for ok in ["1", "1.0", "1.15.4", "0.8.0-1", "2023.10.12", "0.2.0.9000", &"1.".repeat(15)[..29]] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in [
            "",
            ".1",
            "1.",
            "1..2",
            "1.-2",
            "-1",
            "1.0a",
            "1.0 ",
            "１.0",
            "1.0/../x",
            "1.0%2e",
            &"1".repeat(33),
            &"1.".repeat(20)[..39],
        ] {
            assert!(!valid_version(bad), "{bad:?}");
        }
        assert!(valid_name("data.table") && valid_name(&"a".repeat(MAX_NAME)));
        assert!(!valid_name(&"a".repeat(MAX_NAME + 1)));
    }

    pub(crate) const PACKAGES: &str = "Package: nxdep\nVersion: 0.1.0\nMD5sum: 0123456789abcdef0123456789ABCDEF\n\n\
        Package: nxallowed\nVersion: 1.0\nImports: nxdep (>= 0.1),\n    methods\nLinkingTo: Rcpp\nMD5sum: 00000000000000000000000000000000\n\n\
        Package: nxdenied\nVersion: 2.1-3\nDepends: R (>= 4.0)\n";

    fn rule(name: &str) -> PackageRule {
        PackageRule { name: name.into(), versions: vec![] }
    }

    #[test]
    fn parses_checksums_and_dependencies() {
        let idx = Index::parse(PACKAGES).unwrap();
        assert_eq!(idx.entries.len(), 3);
        let dep = idx.find("nxdep", "0.1.0").unwrap();
        assert_eq!(dep.md5.as_deref(), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(dep.tarball(), "nxdep_0.1.0.tar.gz");
        let allowed = idx.find("nxallowed", "1.0").unwrap();
        assert_eq!(allowed.hard_dependencies().into_iter().collect::<Vec<_>>(), ["Rcpp", "methods", "nxdep"]);
        assert!(idx.find("nxdenied", "2.1-3").unwrap().hard_dependencies().is_empty());
        assert!(idx.find("nxdep", "0.2").is_none());
    }

    #[test]
    fn refuses_names_and_versions_that_could_escape_a_path() {
        for bad in ["Package: ../x\nVersion: 1\n", "Package: ok\nVersion: 1/../../x\n", "Version: 1\n"] {
            assert!(Index::parse(bad).is_err(), "{bad}");
        }
        let err = Index::parse("Package: ok\nVersion: 1\nMD5sum: zz\n").unwrap_err().to_string();
        assert!(err.contains("ok") && err.contains("MD5sum"), "{err}");
    }

    #[test]
    fn filtered_index_hides_what_the_project_may_not_install() {
        let idx = Index::parse(PACKAGES).unwrap();
        let policy = MirrorPolicy { enabled: true, allow: vec![], deny: vec![rule("nxdenied")] };
        let names: Vec<_> = idx.filtered(Some(&policy)).entries.into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["nxdep", "nxallowed"]);
        assert!(idx.filtered(None).entries.is_empty(), "no policy: nothing");
        let text = idx.filtered(Some(&policy)).to_dcf();
        assert!(!text.contains("nxdenied"));
        assert_eq!(Index::parse(&text).unwrap(), idx.filtered(Some(&policy)));
    }

    #[test]
    fn rds_has_every_field_as_a_column() {
        let idx = Index::parse(PACKAGES).unwrap();
        let rds = idx.to_rds();
        let hex = hex::encode(&rds);
        for col in ["Package", "Version", "MD5sum", "Imports", "LinkingTo", "Depends"] {
            assert!(hex.contains(&hex::encode(col)), "{col}");
        }
        // 3 rows x 6 columns.
        assert!(hex.contains("0000000d000000020000000300000006"));
    }
}
