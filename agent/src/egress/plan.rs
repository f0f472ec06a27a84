//! What the egress table must contain, computed from the agent config alone (no I/O).
//!
//! The table `inet noexit` has three base chains with policy `drop`:
//! - `output`: loopback, established/related, DNS (UDP+TCP 53) to the configured resolvers,
//!   TCP to the allowed endpoints, IPv6 neighbour discovery; everything else is logged
//!   (rate-limited), counted in the named counter `blocked_out` and rejected with
//!   ICMP "administratively prohibited" so programs fail at once instead of hanging.
//! - `input`: loopback, established/related, TCP to the desktop port from the gateway
//!   sources, IPv6 neighbour discovery; everything else counted in `blocked_in` and dropped.
//! - `forward`: nothing (a workspace never routes).
//!
//! "Established" is not enough on its own: a connection opened before the lock (or while
//! someone had flushed it) would stay open after. So every flow the lock allows gets the
//! conntrack mark [`FLOW_MARK`] when it starts, and only marked flows pass as established;
//! restoring the table therefore also cuts whatever was opened in the gap.
//!
//! Every rule carries a comment so `nft list table inet noexit` explains itself.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use nftables::expr::{CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, Counter, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Limit, Log, Mangle, Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};
use noexit_crds::agent::AgentConfig;

use super::EgressError;

/// Name of the table the agent owns (family `inet`: IPv4 and IPv6 in one table).
pub const TABLE: &str = "noexit";
pub const FAMILY: NfFamily = NfFamily::INet;
/// [`FAMILY`] as nft spells it in JSON.
pub const FAMILY_NAME: &str = "inet";
/// Named counter of outbound packets the lock rejected.
pub const BLOCKED_OUT: &str = "blocked_out";
/// Named counter of inbound packets the lock dropped.
pub const BLOCKED_IN: &str = "blocked_in";
/// Kernel log prefix of blocked outbound packets (`journalctl -k | grep noexit-egress`).
pub const LOG_PREFIX: &str = "noexit-egress-blocked: ";
const DNS_PORT: u32 = 53;
/// Conntrack mark of flows the lock allowed ("noex").
pub const FLOW_MARK: u32 = 0x6e6f_6578;

/// An address or a CIDR block, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, prefix: max_prefix(addr) }
    }

    pub fn is_host(&self) -> bool {
        self.prefix == max_prefix(self.addr)
    }

    fn family_proto(&self) -> &'static str {
        if self.addr.is_ipv4() { "ip" } else { "ip6" }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}`: prefix length must be 0..={max}")),
            },
        };
        // A /0 would turn an allow rule into "everything"; nobody means that.
        if prefix == 0 {
            return Err(format!("`{s}`: a /0 block would allow every address"));
        }
        Ok(Self { addr: mask(addr, prefix), prefix })
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a) & (u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
            IpAddr::V4(bits.into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a) & (u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0));
            IpAddr::V6(bits.into())
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() { write!(f, "{}", self.addr) } else { write!(f, "{}/{}", self.addr, self.prefix) }
    }
}

/// The planned table: objects in the order they are created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub table: Table<'static>,
    pub counters: Vec<Counter<'static>>,
    pub chains: Vec<Chain<'static>>,
    pub rules: Vec<Rule<'static>>,
}

impl Ruleset {
    /// Table, counters, chains, rules: the shape `nft -j list table` prints.
    pub fn objects(&self) -> Vec<NfListObject<'static>> {
        let mut out = vec![NfListObject::Table(self.table.clone())];
        out.extend(self.counters.iter().cloned().map(NfListObject::Counter));
        out.extend(self.chains.iter().cloned().map(NfListObject::Chain));
        out.extend(self.rules.iter().cloned().map(NfListObject::Rule));
        out
    }

    /// One atomic nft transaction that replaces whatever table of that name exists with the
    /// plan: `add table` (so `delete` cannot fail), `delete table`, then every object. Either
    /// all of it takes effect or nothing changes, so a failed apply never leaves a gap.
    pub fn replace_batch(&self) -> Nftables<'static> {
        let mut objects = vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(self.table.clone()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(self.table.clone()))),
        ];
        objects.extend(self.objects().into_iter().map(|o| NfObject::CmdObject(NfCmd::Add(o))));
        Nftables { objects: Cow::Owned(objects) }
    }

    /// Rule comments of one chain, in order (the identity of each rule when comparing).
    pub fn comments(&self, chain: &str) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.chain == chain)
            .map(|r| r.comment.as_deref().unwrap_or_default().to_string())
            .collect()
    }
}

/// The ruleset for `cfg`. Refuses addresses that do not parse, naming the field.
pub fn plan(cfg: &AgentConfig) -> Result<Ruleset, EgressError> {
    let egress = &cfg.egress;
    let resolvers: Vec<Net> = egress.resolvers.iter().map(|a| Net::host(*a)).collect();
    let mut endpoints = Vec::new();
    for (i, e) in egress.endpoints.iter().enumerate() {
        let net = e.address.parse::<Net>().map_err(|reason| EgressError::Config {
            field: format!("egress.endpoints[{i}].address ({})", e.name),
            reason,
        })?;
        if e.port == 0 {
            return Err(EgressError::Config {
                field: format!("egress.endpoints[{i}].port ({})", e.name),
                reason: "port 0 is not a destination".into(),
            });
        }
        endpoints.push((e.name.as_str(), net, e.port));
    }
    let mut gateways = Vec::new();
    for (i, g) in egress.gateway_sources.iter().enumerate() {
        let net = g
            .parse::<Net>()
            .map_err(|reason| EgressError::Config { field: format!("egress.gatewaySources[{i}]"), reason })?;
        gateways.push(net);
    }

    let table = Table { family: FAMILY, name: TABLE.into(), handle: None };
    let counters = [BLOCKED_OUT, BLOCKED_IN]
        .into_iter()
        .map(|name| Counter {
            family: FAMILY,
            table: TABLE.into(),
            name: name.into(),
            handle: None,
            packets: None,
            bytes: None,
        })
        .collect();
    let chains = [("output", NfHook::Output), ("input", NfHook::Input), ("forward", NfHook::Forward)]
        .into_iter()
        .map(|(name, hook)| Chain {
            family: FAMILY,
            table: TABLE.into(),
            name: name.into(),
            _type: Some(NfChainType::Filter),
            hook: Some(hook),
            prio: Some(0),
            policy: Some(NfChainPolicy::Drop),
            ..Chain::default()
        })
        .collect();

    let mut rules = Vec::new();
    let mut out = |comment: String, expr: Vec<Statement<'static>>| rules.push(rule("output", comment, expr));
    out("loopback".into(), vec![eq(meta(MetaKey::Oif), s("lo")), accept()]);
    out("allowed flows: replies and related".into(), vec![established(), marked(), accept()]);
    out("ipv6 neighbour discovery".into(), neighbour_discovery());
    for r in &resolvers {
        for proto in ["udp", "tcp"] {
            out(format!("dns {proto} {r}"), vec![addr("daddr", r), port(proto, DNS_PORT), mark(), accept()]);
        }
    }
    for (name, net, p) in &endpoints {
        out(
            format!("{name} tcp {net} port {p}"),
            vec![addr("daddr", net), port("tcp", u32::from(*p)), mark(), accept()],
        );
    }
    out("log blocked (rate-limited)".into(), vec![log_limit(), log()]);
    out("blocked".into(), vec![counter(BLOCKED_OUT), reject()]);

    let mut inp = |comment: String, expr: Vec<Statement<'static>>| rules.push(rule("input", comment, expr));
    inp("loopback".into(), vec![eq(meta(MetaKey::Iif), s("lo")), accept()]);
    inp("allowed flows: replies and related".into(), vec![established(), marked(), accept()]);
    inp("ipv6 neighbour discovery".into(), neighbour_discovery());
    for g in &gateways {
        inp(
            format!("desktop from gateway {g} port {}", egress.desktop_port),
            vec![addr("saddr", g), port("tcp", u32::from(egress.desktop_port)), mark(), accept()],
        );
    }
    inp("blocked".into(), vec![counter(BLOCKED_IN), Statement::Drop(None)]);

    Ok(Ruleset { table, counters, chains, rules })
}

fn rule(chain: &'static str, comment: String, expr: Vec<Statement<'static>>) -> Rule<'static> {
    Rule {
        family: FAMILY,
        table: TABLE.into(),
        chain: chain.into(),
        expr: Cow::Owned(expr),
        handle: None,
        index: None,
        comment: Some(format!("noexit: {comment}").into()),
    }
}

fn s(v: &'static str) -> Expression<'static> {
    Expression::String(v.into())
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op: Operator::EQ })
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn addr(field: &'static str, net: &Net) -> Statement<'static> {
    let a = Expression::String(net.addr.to_string().into());
    let right = if net.is_host() {
        a
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix { addr: Box::new(a), len: u32::from(net.prefix) }))
    };
    eq(payload(net.family_proto(), field), right)
}

fn port(proto: &'static str, p: u32) -> Statement<'static> {
    eq(payload(proto, "dport"), Expression::Number(p))
}

fn established() -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT { key: "state".into(), family: None, dir: None })),
        right: Expression::List(vec![s("established"), s("related")]),
        op: Operator::IN,
    })
}

/// Without neighbour solicitations/advertisements no IPv6 address on the link is reachable,
/// including allowed ones. Only with hop limit 255 (RFC 4861 §7.1: receivers drop anything
/// else): such a packet was never routed and can never be, so it stays on the local link,
/// where the outer wall sits. Without the check ICMPv6 of these types with any hop limit would
/// be a channel to any IPv6 address.
fn neighbour_discovery() -> Vec<Statement<'static>> {
    vec![
        eq(payload("ip6", "hoplimit"), Expression::Number(ND_HOP_LIMIT)),
        eq(
            payload("icmpv6", "type"),
            Expression::Named(NamedExpression::Set(vec![
                nftables::expr::SetItem::Element(s("nd-neighbor-solicit")),
                nftables::expr::SetItem::Element(s("nd-neighbor-advert")),
            ])),
        ),
        accept(),
    ]
}

/// The hop limit every neighbour discovery message carries (RFC 4861).
pub const ND_HOP_LIMIT: u32 = 255;

fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT { key: "mark".into(), family: None, dir: None }))
}

/// Only flows that started through one of our allow rules.
fn marked() -> Statement<'static> {
    eq(ct_mark(), Expression::Number(FLOW_MARK))
}

fn mark() -> Statement<'static> {
    Statement::Mangle(Mangle { key: ct_mark(), value: Expression::Number(FLOW_MARK) })
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn counter(name: &'static str) -> Statement<'static> {
    Statement::Counter(nftables::stmt::Counter::Named(name.into()))
}

fn log_limit() -> Statement<'static> {
    Statement::Limit(Limit {
        rate: 10,
        rate_unit: None,
        per: Some("minute".into()),
        burst: Some(5),
        burst_unit: None,
        inv: None,
    })
}

fn log() -> Statement<'static> {
    Statement::Log(Some(Log { prefix: Some(LOG_PREFIX.into()), ..Log::new(None) }))
}

fn reject() -> Statement<'static> {
    Statement::Reject(Some(Reject::new(Some(RejectType::ICMPX), Some(RejectCode::AdminProhibited))))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config() -> AgentConfig {
        serde_yaml::from_str(
            r#"
workspace: { project: ward-7, name: alice-r }
controlPlane:
  url: https://10.96.0.20:8443
  caFile: /etc/noexit/ca.pem
  certFile: /etc/noexit/tls.crt
  keyFile: /etc/noexit/tls.key
egress:
  resolvers: [10.96.0.10, "fd00:96::10"]
  endpoints:
    - { name: mirror, address: 10.96.0.30, port: 443 }
    - { name: controlPlane, address: 10.96.0.20, port: 8443 }
    - { name: mirrorV6, address: "fd00:96::30/128", port: 443 }
    - { name: site-proxy, address: 192.168.7.9/24, port: 3128 }
  gatewaySources: [10.0.5.0/24]
  desktopPort: 5901
  canary: { name: kube-api, address: 10.96.0.1, port: 443 }
mode: vm
desktop: vnc
"#,
        )
        .unwrap()
    }

    #[test]
    fn nets_parse_mask_and_refuse_nonsense() {
        assert_eq!("10.1.2.3".parse::<Net>().unwrap().to_string(), "10.1.2.3");
        assert_eq!("10.1.2.3/24".parse::<Net>().unwrap().to_string(), "10.1.2.0/24");
        assert_eq!("fd00::1:2/112".parse::<Net>().unwrap().to_string(), "fd00::1:0/112");
        assert_eq!("fd00::1/128".parse::<Net>().unwrap(), Net::host("fd00::1".parse().unwrap()));
        assert!("10.0.0.0/0".parse::<Net>().unwrap_err().contains("every address"));
        assert!("10.0.0.0/33".parse::<Net>().is_err());
        assert!("mirror.local".parse::<Net>().is_err());
    }

    #[test]
    fn plan_orders_allows_before_the_block() {
        let rs = plan(&config()).unwrap();
        assert_eq!(
            rs.comments("output"),
            [
                "noexit: loopback",
                "noexit: allowed flows: replies and related",
                "noexit: ipv6 neighbour discovery",
                "noexit: dns udp 10.96.0.10",
                "noexit: dns tcp 10.96.0.10",
                "noexit: dns udp fd00:96::10",
                "noexit: dns tcp fd00:96::10",
                "noexit: mirror tcp 10.96.0.30 port 443",
                "noexit: controlPlane tcp 10.96.0.20 port 8443",
                "noexit: mirrorV6 tcp fd00:96::30 port 443",
                "noexit: site-proxy tcp 192.168.7.0/24 port 3128",
                "noexit: log blocked (rate-limited)",
                "noexit: blocked",
            ]
        );
        assert_eq!(
            rs.comments("input"),
            [
                "noexit: loopback",
                "noexit: allowed flows: replies and related",
                "noexit: ipv6 neighbour discovery",
                "noexit: desktop from gateway 10.0.5.0/24 port 5901",
                "noexit: blocked",
            ]
        );
        assert!(rs.comments("forward").is_empty());
        assert!(rs.chains.iter().all(|c| c.policy == Some(NfChainPolicy::Drop)));
    }

    #[test]
    fn neighbour_discovery_only_with_hop_limit_255() {
        let rs = plan(&config()).unwrap();
        for chain in ["output", "input"] {
            let nd: Vec<_> = rs
                .rules
                .iter()
                .filter(|r| r.chain == chain && r.comment.as_deref() == Some("noexit: ipv6 neighbour discovery"))
                .collect();
            assert_eq!(nd.len(), 1, "{chain}");
            let expr = serde_json::to_value(&nd[0].expr).unwrap();
            assert_eq!(
                expr[0],
                serde_json::json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "hoplimit"}}, "right": 255}}),
                "{chain}: the hop limit is matched first"
            );
            assert_eq!(expr[1]["match"]["left"]["payload"]["field"], "type", "{chain}");
            assert_eq!(expr[2], serde_json::json!({"accept": null}), "{chain}");
            // No other rule accepts ICMPv6 by type.
            let others = rs.rules.iter().filter(|r| r.chain == chain && !std::ptr::eq(*r, nd[0]));
            for r in others {
                assert!(!serde_json::to_string(&r.expr).unwrap().contains("icmpv6"), "{chain}: {:?}", r.comment);
            }
        }
    }

    #[test]
    fn no_gateway_means_no_inbound_desktop() {
        let mut cfg = config();
        cfg.egress.gateway_sources.clear();
        let rs = plan(&cfg).unwrap();
        assert!(!rs.comments("input").iter().any(|c| c.contains("desktop")));
    }

    #[test]
    fn bad_addresses_are_refused_with_the_field() {
        let mut cfg = config();
        cfg.egress.endpoints[1].address = "control-plane.svc".into();
        let err = plan(&cfg).unwrap_err().to_string();
        assert!(err.contains("egress.endpoints[1].address (controlPlane)"), "{err}");
        let mut cfg = config();
        cfg.egress.gateway_sources = vec!["0.0.0.0/0".into()];
        let err = plan(&cfg).unwrap_err().to_string();
        assert!(err.contains("egress.gatewaySources[0]"), "{err}");
    }

    #[test]
    fn replace_batch_snapshot() {
        let batch = plan(&config()).unwrap().replace_batch();
        // The exact JSON handed to `nft -j -f -`.
        insta::assert_snapshot!(serde_json::to_string_pretty(&batch).unwrap());
    }
}
