//! Pure renderers: what libvirt, nftables (the project tables and the services table) and the
//! seed must hold. No I/O.

pub mod domain;
pub mod network;
pub mod nft;
pub mod seed;
pub mod services;

/// Escape text for XML element content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The `<metadata>` element marking an object as noexit's, with the hash of everything else
/// (so a changed manifest is seen without parsing libvirt's normalised XML back).
pub fn metadata(attrs: &[(&str, &str)], hash: &str) -> String {
    let mut a = String::new();
    for (k, v) in attrs {
        a.push_str(&format!(" {k}=\"{}\"", xml_escape(v)));
    }
    format!(
        "  <metadata>\n    <{p}:owner xmlns:{p}=\"{ns}\"{a} hash=\"{hash}\"/>\n  </metadata>\n",
        p = crate::XMLNS_PREFIX,
        ns = crate::XMLNS
    )
}

/// The owner marker in an object's XML as libvirt returns it, if noexit made it.
pub fn owner(xml: &str) -> Option<crate::plan::Owner> {
    let start = xml.find("<metadata>")?;
    let end = start + xml[start..].find("</metadata>")?;
    let meta = &xml[start..end];
    let ns = meta.find(crate::XMLNS)?;
    let el_start = meta[..ns].rfind('<')?;
    let el = &meta[el_start..el_start + meta[el_start..].find('>')?];
    Some(crate::plan::Owner { instance: attr(el, "instance")?, hash: attr(el, "hash")? })
}

/// An attribute's value in one element's text (either quote).
pub fn attr(el: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let start = el.find(&key)? + key.len();
    let quote = el[start..].chars().next()?;
    let rest = &el[start + 1..];
    Some(rest[..rest.find(quote)?].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_and_hash_roundtrip() {
        assert_eq!(xml_escape("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
        let m = format!("<domain>{}</domain>", metadata(&[("instance", "i1"), ("project", "p")], "abc"));
        assert_eq!(owner(&m), Some(crate::plan::Owner { instance: "i1".into(), hash: "abc".into() }));
        // libvirt's own formatting (single quotes).
        let libvirt = "<domain><metadata>\n<noexit:owner xmlns:noexit='https://noexit.io/xmlns/libvirt/v1' instance='i2' project='p' hash='f00'/>\n</metadata></domain>";
        assert_eq!(owner(libvirt).map(|o| o.hash), Some("f00".into()));
        assert_eq!(owner("<domain><metadata><other xmlns='x' hash='1'/></metadata></domain>"), None);
        assert_eq!(owner("<domain/>"), None);
    }
}
