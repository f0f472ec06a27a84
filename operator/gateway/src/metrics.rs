//! The gateway's Prometheus metrics. Labels come from fixed sets only.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// One of [`crate::rfb::DropReason::as_str`], a refusal code, or an RFB error category.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `reloaded` or `failed`.
    pub outcome: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    /// Messages (or encodings) removed by the RFB filter, by reason.
    pub drops: Family<ReasonLabels, Counter>,
    /// Bytes removed by the RFB filter, by reason.
    pub dropped_bytes: Family<ReasonLabels, Counter>,
    /// Connections closed for a protocol violation, by RFB error category.
    pub violations: Family<ReasonLabels, Counter>,
    /// Refused sign-ins and connects, by refusal code.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Desktop sessions ended, by why.
    pub session_ends: Family<ReasonLabels, Counter>,
    pub sessions_active: Gauge,
    pub bytes_to_browser: Counter,
    pub bytes_to_desktop: Counter,
    /// Server certificate reloads after its files changed, by outcome.
    pub tls_reloads: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("noexit_gateway");
        let m = Metrics {
            drops: Family::default(),
            dropped_bytes: Family::default(),
            violations: Family::default(),
            refusals: Family::default(),
            session_ends: Family::default(),
            sessions_active: Gauge::default(),
            bytes_to_browser: Counter::default(),
            bytes_to_desktop: Counter::default(),
            tls_reloads: Family::default(),
            registry: Registry::default(),
        };
        registry.register("rfb_drops", "Messages or encodings the RFB filter removed, by reason", m.drops.clone());
        registry.register("rfb_dropped_bytes", "Bytes the RFB filter removed, by reason", m.dropped_bytes.clone());
        registry.register("rfb_violations", "Connections closed for an RFB protocol violation", m.violations.clone());
        registry.register("refusals", "Refused sign-ins and desktop connects, by code", m.refusals.clone());
        registry.register("session_ends", "Desktop sessions ended, by reason", m.session_ends.clone());
        registry.register("sessions_active", "Desktop sessions open now", m.sessions_active.clone());
        registry.register("bytes_to_browser", "Bytes sent to browsers after filtering", m.bytes_to_browser.clone());
        registry.register("bytes_to_desktop", "Bytes sent to desktops after filtering", m.bytes_to_desktop.clone());
        registry.register("tls_reloads", "Server certificate reloads after its files changed", m.tls_reloads.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
