//! The request handler the DNS library calls for every parsed query: rate limit per source,
//! [`Zone::decide`], the response on the wire, then metrics and the (rate-limited) audit entry
//! for a refused name.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hickory_proto::op::{Edns, Header, HeaderCounts, LowerQuery, Metadata, ResponseCode};
use hickory_proto::rr::Record;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::answer::{Decision, NameCaps, Refusal, Zone, audit_name};
use super::audit::{NotQueued, Refused, Writer, refusal_event};
use super::limit::{Buckets, Rate, Take};
use noexit_mirror::clients::ClientMap;
use noexit_mirror::reload::Watched;

/// UDP payload size advertised to EDNS clients (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;
/// Metric label and audit key of a source no workspace holds.
pub const UNKNOWN: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// `answered`, `nodata`, `nxdomain`, `malformed`, or a [`Refusal::category`].
    pub result: &'static str,
    /// `udp` or `tcp`.
    pub protocol: &'static str,
}

/// A project name (from the clients file, so bounded by the projects there) or `unknown`.
/// Never a query name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectLabels {
    pub project: String,
}

/// The DNS server's metrics (prefix `noexit_dns`).
pub struct DnsMetrics {
    registry: Registry,
    pub queries: Family<QueryLabels, Counter>,
    pub refused: Family<ProjectLabels, Counter>,
    pub audit_suppressed: Family<ProjectLabels, Counter>,
    pub audit_dropped: Counter,
    pub audit_failed: Counter,
    pub sources: Gauge,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("noexit_dns");
        let m = Self {
            registry: Registry::default(),
            queries: Family::default(),
            refused: Family::default(),
            audit_suppressed: Family::default(),
            audit_dropped: Counter::default(),
            audit_failed: Counter::default(),
            sources: Gauge::default(),
        };
        // Families and counters are shared handles: register clones, keep the originals.
        registry.register("queries", "Queries by result and protocol", m.queries.clone());
        registry.register(
            "refused_names",
            "Queries for names a workspace may not resolve (NXDOMAIN or REFUSED), by project",
            m.refused.clone(),
        );
        registry.register(
            "audit_suppressed",
            "Refused names left out of the audit log by the per-workspace limit, by project",
            m.audit_suppressed.clone(),
        );
        registry.register("audit_dropped", "Audit entries dropped because the queue was full", m.audit_dropped.clone());
        registry.register("audit_failed", "Audit entries the audit store refused", m.audit_failed.clone());
        registry.register("rate_limit_sources", "Source addresses with a rate-limit bucket", m.sources.clone());
        Self { registry, ..m }
    }
}

impl DnsMetrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Limits of the handler.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub caps: NameCaps,
    /// Queries per source address.
    pub query_rate: Rate,
    /// Audit entries per workspace.
    pub audit_rate: Rate,
    /// Most source addresses (and workspaces) tracked at once.
    pub max_sources: usize,
    /// Longest name written to the audit log, in characters.
    pub audit_name_chars: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            caps: NameCaps::default(),
            query_rate: Rate::new(50.0, 100),
            audit_rate: Rate::new(10.0 / 60.0, 20),
            max_sources: 4096,
            audit_name_chars: 256,
        }
    }
}

pub struct Handler {
    zone: Zone,
    settings: Settings,
    sources: Mutex<Buckets<IpAddr>>,
    audits: Mutex<Buckets<String>>,
    clients: Arc<Watched<ClientMap>>,
    metrics: Arc<DnsMetrics>,
    audit: Writer,
}

/// IPv4-mapped IPv6 sources (dual-stack sockets) count as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn protocol_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Udp => "udp",
        Protocol::Tcp => "tcp",
        _ => "other",
    }
}

impl Handler {
    pub fn new(
        zone: Zone,
        settings: Settings,
        clients: Arc<Watched<ClientMap>>,
        metrics: Arc<DnsMetrics>,
        audit: Writer,
    ) -> Self {
        Self {
            zone,
            settings,
            sources: Mutex::new(Buckets::new(settings.query_rate, settings.max_sources)),
            audits: Mutex::new(Buckets::new(settings.audit_rate, settings.max_sources)),
            clients,
            metrics,
            audit,
        }
    }

    /// Rate limit, then answer.
    fn decide(&self, src: IpAddr, request: &Request, query: &LowerQuery, now: Instant) -> Decision {
        let take = {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let take = sources.take(&src, now);
            self.metrics.sources.set(i64::try_from(sources.len()).unwrap_or(i64::MAX));
            take
        };
        match take {
            Take::Refused => Decision::Refused(Refusal::RateLimited),
            Take::Allowed { .. } => self.zone.decide(
                &self.settings.caps,
                request.metadata.op_code,
                query.name(),
                query.query_type(),
                query.query_class(),
            ),
        }
    }

    /// Count the query; count and (within the workspace's audit rate) audit a refused name.
    fn account(&self, src: IpAddr, protocol: Protocol, query: &LowerQuery, d: &Decision, now: Instant) {
        self.metrics
            .queries
            .get_or_create(&QueryLabels { result: d.category(), protocol: protocol_label(protocol) })
            .inc();
        let Some(reason) = d.refusal_reason() else { return };
        let clients = self.clients.get();
        let workspace = clients.lookup(src);
        let project = ProjectLabels { project: workspace.map_or(UNKNOWN, |w| w.project.as_str()).to_owned() };
        self.metrics.refused.get_or_create(&project).inc();
        let key = workspace.map_or_else(|| UNKNOWN.to_owned(), ToString::to_string);
        let take = self.audits.lock().unwrap_or_else(|p| p.into_inner()).take(&key, now);
        let Take::Allowed { refused_before } = take else {
            self.metrics.audit_suppressed.get_or_create(&project).inc();
            return;
        };
        let shown = audit_name(query.original().name(), self.settings.audit_name_chars);
        let qtype = query.query_type();
        tracing::info!(workspace = %key, source = %src, name = %shown, %qtype, result = d.category(), "refused name");
        let event = refusal_event(&Refused {
            workspace,
            source: src,
            name: &shown,
            qtype: &qtype.to_string(),
            category: d.category(),
            reason,
            suppressed: refused_before,
        });
        match self.audit.send(event) {
            Ok(()) => {}
            Err(NotQueued::Full) => {
                self.metrics.audit_dropped.inc();
                tracing::warn!("audit queue full: a refused DNS name was not recorded");
            }
            Err(NotQueued::Closed) => {
                self.metrics.audit_dropped.inc();
            }
        }
    }
}

fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let src = canonical(request.src().ip());
        let edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_PAYLOAD);
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        // Recursion available stays clear: this server answers for its own zone only.
        let mut meta = Metadata::response_from_request(&request.metadata);
        let query = match request.request_info() {
            Ok(info) => info.query.clone(),
            Err(_) => {
                // Not exactly one question: nothing to decide on.
                let labels = QueryLabels { result: "malformed", protocol: protocol_label(request.protocol()) };
                self.metrics.queries.get_or_create(&labels).inc();
                meta.response_code = ResponseCode::FormErr;
                return response
                    .send_response(builder.build_no_records(meta))
                    .await
                    .unwrap_or_else(|_| failed(request));
            }
        };
        let now = Instant::now();
        let decision = self.decide(src, request, &query, now);
        self.account(src, request.protocol(), &query, &decision, now);
        let none = std::iter::empty::<&Record>;
        let sent = match &decision {
            Decision::Answer(records) => {
                meta.authoritative = true;
                response.send_response(builder.build(meta, records.iter(), none(), none(), none())).await
            }
            Decision::NoData(soa) | Decision::NxDomain(soa) => {
                meta.authoritative = true;
                if matches!(decision, Decision::NxDomain(_)) {
                    meta.response_code = ResponseCode::NXDomain;
                }
                response.send_response(builder.build(meta, none(), none(), std::iter::once(soa), none())).await
            }
            Decision::Refused(_) => {
                meta.response_code = ResponseCode::Refused;
                response.send_response(builder.build_no_records(meta)).await
            }
        };
        sent.unwrap_or_else(|e| {
            tracing::debug!(error = %e, source = %src, "cannot send a DNS response");
            failed(request)
        })
    }
}
