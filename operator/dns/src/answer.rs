//! What the workspace DNS server says to one query: a pure function of the configured names,
//! the limits and the question. No I/O, no clock; [`super::handler`] puts it on the wire.
//!
//! The server is authoritative for the zones that hold the configured names (by default
//! `<operatorNamespace>.svc.`) and for nothing else:
//! - a configured name gets its addresses (A or AAAA as configured; ANY gets both, RFC 8482's
//!   small answer), any other type an empty NOERROR with the zone's SOA;
//! - any other name inside the zone gets NXDOMAIN with the SOA;
//! - every name outside the zone gets REFUSED: the server never recurses or forwards, so a
//!   query name never leaves it (the RA bit is always clear);
//! - names longer than the caps, other classes and other opcodes get REFUSED too.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hickory_proto::op::OpCode;
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};

/// Longest name DNS allows in presentation form, without the final dot (RFC 1035: 255 octets
/// on the wire).
pub const DNS_MAX_NAME: usize = 253;
/// Longest label DNS allows.
pub const DNS_MAX_LABEL: usize = 63;
/// Time to live of every answer, in seconds: short, so an address change reaches workspaces
/// soon.
pub const TTL: u32 = 30;

/// Caps on query names, beyond what DNS itself allows. The names a workspace needs are short
/// (`noexit-mirror.noexit-system.svc`); a long name is data, not a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameCaps {
    /// Longest name accepted, in characters without the final dot (at most 253).
    pub max_name: usize,
    /// Longest label accepted (at most 63).
    pub max_label: usize,
}

impl Default for NameCaps {
    fn default() -> Self {
        Self { max_name: 100, max_label: DNS_MAX_LABEL }
    }
}

impl NameCaps {
    /// The caps, never above what DNS allows.
    pub fn new(max_name: usize, max_label: usize) -> Self {
        Self { max_name: max_name.clamp(1, DNS_MAX_NAME), max_label: max_label.clamp(1, DNS_MAX_LABEL) }
    }
}

/// Why a query was refused. [`Refusal::category`] is the metric label and the audit reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not in a zone this server holds: it would have to ask someone else, and it never does.
    NotOurs,
    /// The name is longer than [`NameCaps::max_name`].
    NameTooLong { length: usize },
    /// A label is longer than [`NameCaps::max_label`].
    LabelTooLong { length: usize },
    /// Not class IN.
    Class,
    /// Not a standard query (update, notify, ...).
    Opcode,
    /// The source sent more queries than its rate allows.
    RateLimited,
}

impl Refusal {
    /// A fixed label for metrics and audit entries.
    pub fn category(&self) -> &'static str {
        match self {
            Refusal::NotOurs => "not_a_workspace_name",
            Refusal::NameTooLong { .. } => "name_too_long",
            Refusal::LabelTooLong { .. } => "label_too_long",
            Refusal::Class => "class",
            Refusal::Opcode => "opcode",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotOurs => write!(f, "not a name workspaces may resolve (no recursion, no forwarding)"),
            Refusal::NameTooLong { length } => write!(f, "name of {length} characters is over the cap"),
            Refusal::LabelTooLong { length } => write!(f, "label of {length} characters is over the cap"),
            Refusal::Class => write!(f, "only class IN is served"),
            Refusal::Opcode => write!(f, "only standard queries are served"),
            Refusal::RateLimited => write!(f, "too many queries from this address"),
        }
    }
}

/// The answer to one query.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// NOERROR with these records (authoritative).
    Answer(Vec<Record>),
    /// NOERROR, no records: the name exists, not with this type. Carries the zone's SOA.
    NoData(Record),
    /// NXDOMAIN inside a zone we hold. Carries the zone's SOA.
    NxDomain(Record),
    /// REFUSED.
    Refused(Refusal),
}

impl Decision {
    /// Is the name one a workspace may not resolve? (NXDOMAIN and REFUSED are counted and
    /// audited; an empty answer for a known name, e.g. AAAA of an IPv4 Service, is not.)
    pub fn refusal_reason(&self) -> Option<String> {
        match self {
            Decision::Answer(_) | Decision::NoData(_) => None,
            Decision::NxDomain(_) => Some("no such workspace name".into()),
            Decision::Refused(r) => Some(r.to_string()),
        }
    }

    /// A fixed label for the query metric.
    pub fn category(&self) -> &'static str {
        match self {
            Decision::Answer(_) => "answered",
            Decision::NoData(_) => "nodata",
            Decision::NxDomain(_) => "nxdomain",
            Decision::Refused(r) => r.category(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("DNS name {name:?}: {problem}")]
    Name { name: String, problem: String },
    #[error("address {address:?} of {name}: not an IP address")]
    Address { name: String, address: String },
}

/// The names the server answers, and the zones that hold them.
#[derive(Clone, Debug)]
pub struct Zone {
    records: BTreeMap<LowerName, Vec<Record>>,
    /// Zone apex → its SOA record.
    apexes: BTreeMap<LowerName, Record>,
}

fn parse_name(name: &str) -> Result<Name, ZoneError> {
    let err = |problem: String| ZoneError::Name { name: name.to_owned(), problem };
    let mut n = Name::from_ascii(name).map_err(|e| err(e.to_string()))?;
    n.set_fqdn(true);
    if n.num_labels() < 2 {
        return Err(err("needs at least two labels (a name inside a zone)".into()));
    }
    Ok(n)
}

impl Zone {
    /// A zone answering `names` (`(fully qualified name, address)`; a name may appear more than
    /// once, e.g. with an IPv4 and an IPv6 address). Each name's parent is a zone apex.
    /// `server` names this server in the SOA.
    pub fn new(names: &[(String, String)], server: &str) -> Result<Self, ZoneError> {
        let mut records: BTreeMap<LowerName, Vec<Record>> = BTreeMap::new();
        let mut apexes = BTreeMap::new();
        for (name, address) in names {
            let owner = parse_name(name)?;
            let ip: IpAddr = address
                .trim()
                .parse()
                .map_err(|_| ZoneError::Address { name: name.clone(), address: address.clone() })?;
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            let apex = owner.base_name();
            apexes.entry(LowerName::new(&apex)).or_insert_with(|| soa(&apex, server));
            records.entry(LowerName::new(&owner)).or_default().push(Record::from_rdata(
                owner.to_lowercase(),
                TTL,
                rdata,
            ));
        }
        Ok(Self { records, apexes })
    }

    /// The names answered, lower case with the final dot.
    pub fn names(&self) -> Vec<String> {
        self.records.keys().map(|n| n.to_string()).collect()
    }

    /// The apex of the zone holding `name`, with its SOA, if we hold one.
    fn apex_of(&self, name: &LowerName) -> Option<(&LowerName, &Record)> {
        self.apexes.iter().filter(|(apex, _)| apex.zone_of(name)).max_by_key(|(apex, _)| apex.num_labels())
    }

    /// The answer to `(name, qtype, class)` asked with `opcode`. Names compare without case.
    pub fn decide(
        &self,
        caps: &NameCaps,
        opcode: OpCode,
        name: &LowerName,
        qtype: RecordType,
        class: DNSClass,
    ) -> Decision {
        if opcode != OpCode::Query {
            return Decision::Refused(Refusal::Opcode);
        }
        if let Some(r) = check_length(caps, name) {
            return Decision::Refused(r);
        }
        if class != DNSClass::IN {
            return Decision::Refused(Refusal::Class);
        }
        let Some((apex, soa)) = self.apex_of(name) else {
            return Decision::Refused(Refusal::NotOurs);
        };
        if let Some(records) = self.records.get(name) {
            let wanted: Vec<Record> =
                records.iter().filter(|r| qtype == RecordType::ANY || r.record_type() == qtype).cloned().collect();
            return if wanted.is_empty() { Decision::NoData(soa.clone()) } else { Decision::Answer(wanted) };
        }
        if name == apex {
            return match qtype {
                RecordType::SOA | RecordType::ANY => Decision::Answer(vec![soa.clone()]),
                _ => Decision::NoData(soa.clone()),
            };
        }
        Decision::NxDomain(soa.clone())
    }
}

/// Name length (presentation form, no final dot) and longest label against the caps.
fn check_length(caps: &NameCaps, name: &LowerName) -> Option<Refusal> {
    let labels: Vec<usize> = name.iter().map(<[u8]>::len).collect();
    let length = labels.iter().sum::<usize>() + labels.len().saturating_sub(1);
    if let Some(&longest) = labels.iter().max()
        && longest > caps.max_label
    {
        return Some(Refusal::LabelTooLong { length: longest });
    }
    (length > caps.max_name).then_some(Refusal::NameTooLong { length })
}

fn soa(apex: &Name, server: &str) -> Record {
    let mname = Name::from_ascii(server).ok().filter(|n| n.num_labels() > 0).unwrap_or_else(|| apex.clone());
    let rname =
        Name::from_ascii("hostmaster").ok().and_then(|h| h.append_domain(apex).ok()).unwrap_or_else(|| apex.clone());
    // Serial 1: the zone is generated, secondaries never transfer it. Minimum = negative TTL.
    Record::from_rdata(apex.to_lowercase(), TTL, RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, TTL)))
}

/// A refused name as an auditor reads it: as sent (case kept: case can carry data too),
/// escaped by the DNS library (`\DDD` for bytes that are not printable), at most `max`
/// characters, with a note of the full length when cut.
pub fn audit_name(name: &Name, max: usize) -> String {
    let text = name.to_string();
    if text.chars().count() <= max {
        return text;
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}…({} chars)", text.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        Zone::new(
            &[
                ("noexit-api.noexit-system.svc.".into(), "10.96.100.10".into()),
                ("noexit-mirror.noexit-system.svc.".into(), "10.96.100.11".into()),
                ("noexit-mirror.noexit-system.svc.".into(), "fd00:96::11".into()),
            ],
            "noexit-dns.noexit-system.svc.",
        )
        .expect("zone")
    }

    fn ask(name: &str, qtype: RecordType) -> Decision {
        ask_with(&NameCaps::default(), name, qtype)
    }

    fn ask_with(caps: &NameCaps, name: &str, qtype: RecordType) -> Decision {
        let n = LowerName::new(&Name::from_ascii(name).expect("name"));
        zone().decide(caps, OpCode::Query, &n, qtype, DNSClass::IN)
    }

    fn addresses(d: &Decision) -> Vec<String> {
        match d {
            Decision::Answer(rs) => rs.iter().map(|r| r.data.to_string()).collect(),
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn configured_names_resolve_to_their_addresses() {
        assert_eq!(addresses(&ask("noexit-api.noexit-system.svc.", RecordType::A)), ["10.96.100.10"]);
        assert_eq!(addresses(&ask("noexit-mirror.noexit-system.svc.", RecordType::A)), ["10.96.100.11"]);
        assert_eq!(addresses(&ask("noexit-mirror.noexit-system.svc.", RecordType::AAAA)), ["fd00:96::11"]);
    }

    #[test]
    fn names_compare_without_case() {
        assert_eq!(addresses(&ask("NoExit-API.NOEXIT-system.Svc.", RecordType::A)), ["10.96.100.10"]);
        assert!(matches!(ask("NOPE.noexit-SYSTEM.svc.", RecordType::A), Decision::NxDomain(_)));
    }

    #[test]
    fn aaaa_of_an_ipv4_only_name_is_empty_not_an_error() {
        let d = ask("noexit-api.noexit-system.svc.", RecordType::AAAA);
        let Decision::NoData(soa) = &d else { panic!("{d:?}") };
        assert_eq!(soa.record_type(), RecordType::SOA);
        assert_eq!(soa.name.to_string(), "noexit-system.svc.");
        assert_eq!(d.refusal_reason(), None, "not counted as a refused name");
        assert!(matches!(ask("noexit-api.noexit-system.svc.", RecordType::TXT), Decision::NoData(_)));
        assert!(matches!(ask("noexit-api.noexit-system.svc.", RecordType::MX), Decision::NoData(_)));
    }

    #[test]
    fn any_gets_the_configured_addresses_only() {
        let mut got = addresses(&ask("noexit-mirror.noexit-system.svc.", RecordType::ANY));
        got.sort();
        assert_eq!(got, ["10.96.100.11", "fd00:96::11"]);
        assert_eq!(addresses(&ask("noexit-api.noexit-system.svc.", RecordType::ANY)), ["10.96.100.10"]);
        assert!(matches!(ask("x.example.org.", RecordType::ANY), Decision::Refused(Refusal::NotOurs)));
    }

    #[test]
    fn unknown_names_in_the_zone_are_nxdomain_and_everything_else_is_refused() {
        for name in ["secret.noexit-system.svc.", "x.noexit-api.noexit-system.svc.", "kube-dns.noexit-system.svc."] {
            let d = ask(name, RecordType::A);
            assert!(matches!(d, Decision::NxDomain(_)), "{name}: {d:?}");
            assert!(d.refusal_reason().is_some());
        }
        for name in [
            "c2VjcmV0.example.org.",
            "example.org.",
            "svc.",
            ".",
            "kubernetes.default.svc.cluster.local.",
            "noexit-api.noexit-system.svc.cluster.local.",
            "noexit-api.other.svc.",
            "10.100.96.10.in-addr.arpa.",
        ] {
            assert_eq!(ask(name, RecordType::A), Decision::Refused(Refusal::NotOurs), "{name}");
        }
    }

    #[test]
    fn the_zone_apex_has_only_its_soa() {
        let d = ask("noexit-system.svc.", RecordType::SOA);
        let Decision::Answer(rs) = &d else { panic!("{d:?}") };
        assert_eq!(rs[0].record_type(), RecordType::SOA);
        assert!(matches!(ask("noexit-system.svc.", RecordType::A), Decision::NoData(_)));
    }

    #[test]
    fn long_names_and_labels_are_refused_at_the_caps() {
        let caps = NameCaps::new(40, 20);
        // 31 characters: fine under both caps.
        assert!(matches!(ask_with(&caps, "noexit-api.noexit-system.svc.", RecordType::A), Decision::Answer(_)));
        let label21 = format!("{}.noexit-system.svc.", "a".repeat(21));
        assert_eq!(ask_with(&caps, &label21, RecordType::A), Decision::Refused(Refusal::LabelTooLong { length: 21 }));
        let label20 = format!("{}.noexit-system.svc.", "a".repeat(20));
        assert!(matches!(ask_with(&caps, &label20, RecordType::A), Decision::NxDomain(_)), "exactly at the cap");
        // 41 characters without the final dot.
        let long = format!("{}.{}.noexit-system.svc.", "b".repeat(11), "c".repeat(11));
        assert_eq!(long.len() - 1, 41);
        assert_eq!(ask_with(&caps, &long, RecordType::A), Decision::Refused(Refusal::NameTooLong { length: 41 }));
        // The default cap refuses long names anywhere, before asking whose they are.
        let exfil = format!("{}.{}.example.org.", "d".repeat(60), "e".repeat(60));
        assert_eq!(ask(&exfil, RecordType::A), Decision::Refused(Refusal::NameTooLong { length: 133 }));
        // Caps never exceed what DNS allows.
        assert_eq!(NameCaps::new(1000, 1000), NameCaps { max_name: DNS_MAX_NAME, max_label: DNS_MAX_LABEL });
    }

    #[test]
    fn other_classes_and_opcodes_are_refused() {
        let n = LowerName::new(&Name::from_ascii("noexit-api.noexit-system.svc.").unwrap());
        let z = zone();
        let caps = NameCaps::default();
        assert_eq!(z.decide(&caps, OpCode::Query, &n, RecordType::A, DNSClass::CH), Decision::Refused(Refusal::Class));
        assert_eq!(
            z.decide(&caps, OpCode::Update, &n, RecordType::A, DNSClass::IN),
            Decision::Refused(Refusal::Opcode)
        );
        assert_eq!(
            z.decide(&caps, OpCode::Notify, &n, RecordType::A, DNSClass::IN),
            Decision::Refused(Refusal::Opcode)
        );
    }

    #[test]
    fn bad_configuration_is_refused_naming_the_entry() {
        let e = Zone::new(&[("api.ns.svc.".into(), "10.0.0.300".into())], "dns.").unwrap_err().to_string();
        assert!(e.contains("10.0.0.300") && e.contains("api.ns.svc."), "{e}");
        let e = Zone::new(&[("toplevel.".into(), "10.0.0.1".into())], "dns.").unwrap_err().to_string();
        assert!(e.contains("toplevel."), "{e}");
    }

    #[test]
    fn audited_names_are_escaped_and_bounded() {
        let raw = Name::from_labels(vec![b"a\x01b".to_vec(), b"example".to_vec(), b"org".to_vec()]).unwrap();
        let shown = audit_name(&raw, 100);
        assert!(!shown.contains('\x01') && shown.contains("\\001"), "{shown}");
        let long = Name::from_ascii(format!("{}.example.org.", "x".repeat(60))).unwrap();
        let cut = audit_name(&long, 20);
        assert_eq!(audit_name(&Name::from_ascii("MiXeD.Example.org.").unwrap(), 100), "MiXeD.Example.org.");
        assert!(cut.starts_with(&"x".repeat(20)) && cut.ends_with("(73 chars)"), "{cut}");
    }
}
