//! Reading `nft -j list ruleset` output and comparing it with the plan (pure functions).
//!
//! The listing is handled as plain JSON rather than the `nftables` crate's typed schema: the
//! agent must understand whatever a tamperer left behind, including statements the crate
//! does not model, and must never fail to parse the very thing it guards.

use std::collections::BTreeMap;

use serde_json::Value;

use super::plan::{FAMILY_NAME, Ruleset, TABLE};

/// Our table as it stands, volatile fields (handles, counter values) removed: rules per chain
/// in order, everything else (table, chains, counters) as a sorted list.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Canonical {
    pub objects: Vec<String>,
    pub rules: BTreeMap<String, Vec<Value>>,
}

impl Canonical {
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.rules.is_empty()
    }
}

/// The canonical form of the plan (what the kernel should hold).
pub fn planned(plan: &Ruleset) -> Canonical {
    let objects = plan.objects().into_iter().filter_map(|o| serde_json::to_value(o).ok());
    canonical(objects)
}

/// The canonical form of our table within a full listing (`{"nftables": [...]}`).
pub fn from_listing(listing: &Value) -> Canonical {
    let objects = listing.get("nftables").and_then(Value::as_array).cloned().unwrap_or_default();
    canonical(objects.into_iter().filter(is_ours))
}

fn kind_and_body(obj: &Value) -> Option<(&str, &Value)> {
    let map = obj.as_object()?;
    let (kind, body) = map.iter().next()?;
    Some((kind.as_str(), body))
}

fn is_ours(obj: &Value) -> bool {
    let Some((kind, body)) = kind_and_body(obj) else { return false };
    let table_name = if kind == "table" { body.get("name") } else { body.get("table") };
    body.get("family").and_then(Value::as_str) == Some(FAMILY_NAME) && table_name.and_then(Value::as_str) == Some(TABLE)
}

fn canonical(objects: impl IntoIterator<Item = Value>) -> Canonical {
    let mut out = Canonical::default();
    for obj in objects {
        let Some((kind, body)) = kind_and_body(&obj) else { continue };
        let mut body = body.clone();
        if let Some(map) = body.as_object_mut() {
            map.remove("handle");
            if kind == "counter" {
                map.remove("packets");
                map.remove("bytes");
            }
        }
        match kind {
            "metainfo" => {}
            "rule" => {
                let chain = body.get("chain").and_then(Value::as_str).unwrap_or_default().to_string();
                out.rules.entry(chain).or_default().push(body);
            }
            _ => out.objects.push(serde_json::json!({ kind: body }).to_string()),
        }
    }
    out.objects.sort();
    out
}

/// Packets counted by a named counter of our table, if it exists.
pub fn counter_packets(listing: &Value, name: &str) -> Option<u64> {
    let objects = listing.get("nftables")?.as_array()?;
    objects.iter().filter(|o| is_ours(o)).find_map(|o| {
        let body = o.get("counter")?;
        (body.get("name")?.as_str()? == name).then(|| body.get("packets").and_then(Value::as_u64).unwrap_or(0))
    })
}

/// What differs between `expected` and `live`, in words for a tamper report. Empty = same.
pub fn differences(expected: &Canonical, live: &Canonical) -> Vec<String> {
    if live.is_empty() && !expected.is_empty() {
        return vec![format!("table inet {TABLE} is gone (deleted or flushed)")];
    }
    let mut out = Vec::new();
    for o in &expected.objects {
        if !live.objects.contains(o) {
            out.push(format!("missing or changed: {}", short(o)));
        }
    }
    for o in &live.objects {
        if !expected.objects.contains(o) {
            out.push(format!("unexpected: {}", short(o)));
        }
    }
    let chains: std::collections::BTreeSet<&String> = expected.rules.keys().chain(live.rules.keys()).collect();
    let empty = Vec::new();
    for chain in chains {
        let want = expected.rules.get(chain).unwrap_or(&empty);
        let have = live.rules.get(chain).unwrap_or(&empty);
        if want == have {
            continue;
        }
        let first = want.iter().zip(have).position(|(a, b)| a != b).unwrap_or(want.len().min(have.len()));
        let label = |r: Option<&Value>| {
            r.and_then(|r| r.get("comment")).and_then(Value::as_str).unwrap_or("a rule without comment").to_string()
        };
        out.push(format!(
            "chain {chain}: {} rules instead of {}, first difference at rule {} (expected `{}`, found `{}`)",
            have.len(),
            want.len(),
            first + 1,
            label(want.get(first)),
            label(have.get(first)),
        ));
    }
    out
}

fn short(s: &str) -> String {
    const MAX: usize = 160;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::egress::plan::{plan, tests::config};
    use serde_json::json;

    /// The plan as `nft -j list ruleset` would print it: handles, counter values, metainfo and
    /// another table around it.
    pub(crate) fn listing_of(rs: &Ruleset) -> Value {
        let mut objects = vec![json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}})];
        objects.push(json!({"table": {"family": "ip", "name": "other", "handle": 9}}));
        for (i, o) in rs.objects().into_iter().enumerate() {
            let mut v = serde_json::to_value(o).unwrap();
            let (_, body) = v.as_object_mut().unwrap().iter_mut().next().unwrap();
            body["handle"] = json!(i + 1);
            let is_counter = body.get("name").and_then(Value::as_str).is_some_and(|n| n.starts_with("blocked"));
            if is_counter && body.get("table").is_some() {
                body["packets"] = json!(7);
                body["bytes"] = json!(420);
            }
            objects.push(v);
        }
        json!({ "nftables": objects })
    }

    #[test]
    fn a_faithful_listing_equals_the_plan() {
        let rs = plan(&config()).unwrap();
        let live = from_listing(&listing_of(&rs));
        assert_eq!(differences(&planned(&rs), &live), Vec::<String>::new());
        assert_eq!(counter_packets(&listing_of(&rs), "blocked_out"), Some(7));
        assert_eq!(counter_packets(&listing_of(&rs), "nope"), None);
    }

    #[test]
    fn a_flushed_table_is_reported_as_gone() {
        let rs = plan(&config()).unwrap();
        let live = from_listing(&json!({"nftables": [{"metainfo": {}}]}));
        assert_eq!(differences(&planned(&rs), &live), ["table inet noexit is gone (deleted or flushed)"]);
    }

    #[test]
    fn an_inserted_accept_rule_is_named() {
        let rs = plan(&config()).unwrap();
        let mut listing = listing_of(&rs);
        let objects = listing["nftables"].as_array_mut().unwrap();
        let pos = objects.iter().position(|o| o.get("rule").is_some()).unwrap();
        objects.insert(
            pos,
            json!({"rule": {"family": "inet", "table": "noexit", "chain": "output", "handle": 99,
                "expr": [{"accept": null}]}}),
        );
        let diff = differences(&planned(&rs), &from_listing(&listing));
        assert_eq!(diff.len(), 1, "{diff:?}");
        assert!(diff[0].contains("chain output: 14 rules instead of 13, first difference at rule 1"), "{diff:?}");
        assert!(diff[0].contains("found `a rule without comment`"), "{diff:?}");
    }

    #[test]
    fn a_changed_policy_is_named() {
        let rs = plan(&config()).unwrap();
        let mut listing = listing_of(&rs);
        for o in listing["nftables"].as_array_mut().unwrap() {
            if o.get("chain").is_some_and(|c| c["name"] == "output") {
                o["chain"]["policy"] = json!("accept");
            }
        }
        let diff = differences(&planned(&rs), &from_listing(&listing));
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0].starts_with("missing or changed: {\"chain\""), "{diff:?}");
        assert!(diff[1].contains("\"policy\":\"accept\""), "{diff:?}");
    }
}
