//! The review pages as pure functions of what the API answered: no I/O, every value escaped.
//! No script and no inline style (the pages' CSP allows neither): the stylesheet is
//! `/review/review.css`, images are `data:` URIs, decisions are plain HTML forms carrying the
//! session's CSRF token.

use std::fmt::Write as _;

use noexit_airlock::checks::{Report, Verdict};
use noexit_airlock::render::{escape, review_fragment};

use super::api_client::{ApiError, Decision, Output, segment};

/// The page stylesheet: the airlock renderer's rules and the page's own.
pub fn stylesheet() -> String {
    format!("{}{PAGE_CSS}", noexit_airlock::render::REVIEW_CSS)
}

const PAGE_CSS: &str = "\
body{font-family:system-ui,sans-serif;margin:0;color:#222}\
header{background:#23395d;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}\
header a{color:#fff}header form{margin-left:auto}\
main{padding:16px;max-width:1200px}\
table.meta td,table.meta th{text-align:left;padding:2px 8px}\
table.list{border-collapse:collapse}table.list td,table.list th{border:1px solid #ccc;padding:2px 8px}\
.notice{background:#e4f4e4;border:1px solid #7a7;padding:8px}\
.refusal{background:#fde2e2;border:1px solid #c66;padding:8px}\
.own{background:#fff4d6;border:1px solid #cb8;padding:8px}\
.decisions{display:flex;gap:16px;flex-wrap:wrap}\
.decisions form{border:1px solid #ccc;padding:8px}\
.decisions textarea{display:block;width:22em;height:4em}\
";

/// Who is looking, for the page header and the forms.
pub struct Viewer<'a> {
    pub user: &'a str,
    pub csrf: &'a str,
}

/// A whole page around `body`.
pub fn layout(title: &str, viewer: Option<&Viewer<'_>>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} — noexit review</title>\
         <link rel=\"stylesheet\" href=\"/review/review.css\"></head><body><header><a href=\"/review\">Outputs to review</a>",
        escape(title)
    );
    if let Some(v) = viewer {
        let _ = write!(
            out,
            "<span id=\"user\">{}</span><form method=\"post\" action=\"/logout\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Sign out</button></form>",
            escape(v.user),
            escape(v.csrf)
        );
    }
    let _ = write!(out, "</header><main>{body}</main></body></html>");
    out
}

/// The page for someone not signed in.
pub fn sign_in_page(message: &str) -> String {
    layout(
        "Sign in",
        None,
        &format!(
            "<h1>Sign in first</h1><p class=\"refusal\" id=\"refusal\">{}</p>\
             <p><a href=\"/login\">Sign in</a>, then open <a href=\"/review\">/review</a> again.</p>",
            escape(message)
        ),
    )
}

/// A refusal or failure, said plainly.
pub fn error_page(viewer: Option<&Viewer<'_>>, title: &str, code: &str, message: &str, back: Option<&str>) -> String {
    let back = back.map(|b| format!("<p><a href=\"{}\">Back</a></p>", escape(b))).unwrap_or_default();
    layout(
        title,
        viewer,
        &format!(
            "<h1>{}</h1><p class=\"refusal\" id=\"refusal\" data-code=\"{}\">{}</p>{back}",
            escape(title),
            escape(code),
            escape(message)
        ),
    )
}

/// One project's part of the `/review` list.
pub struct ProjectOutputs {
    pub project: String,
    pub outputs: Result<Vec<Output>, ApiError>,
}

fn verdict_of(o: &Output) -> &'static str {
    match o.checks.as_ref().map(|c| c.verdict) {
        Some(Verdict::Pass) => "pass",
        Some(Verdict::Review) => "review",
        Some(Verdict::Fail) => "fail",
        Some(Verdict::Refuse) => "refused",
        None => "not checked yet",
    }
}

fn output_href(project: &str, id: &str) -> String {
    format!("/review/{}/{}", segment(project), segment(id))
}

/// `/review`: per project where the viewer is an output checker, the outputs awaiting review.
pub fn list_page(viewer: &Viewer<'_>, projects: &[ProjectOutputs]) -> String {
    let mut body = String::from("<h1>Outputs awaiting review</h1>");
    if projects.is_empty() {
        body.push_str(
            "<p id=\"no-projects\">You are not an output checker of any project. A project admin adds \
             the <code>outputChecker</code> role to your membership.</p>",
        );
    }
    for p in projects {
        let _ = write!(body, "<section class=\"project\" data-project=\"{0}\"><h2>{0}</h2>", escape(&p.project));
        match &p.outputs {
            Err(e) => {
                let _ = write!(
                    body,
                    "<p class=\"refusal\" data-code=\"{}\">{}</p>",
                    escape(e.code()),
                    escape(&e.to_string())
                );
            }
            Ok(list) if list.is_empty() => body.push_str("<p>Nothing awaits review.</p>"),
            Ok(list) => {
                body.push_str(
                    "<table class=\"list\"><tr><th>file</th><th>workspace</th><th>requester</th><th>checks</th>\
                     <th>state</th><th>reviews</th><th>submitted</th></tr>",
                );
                for o in list {
                    let own = if o.requester == viewer.user { " (yours: you cannot review it)" } else { "" };
                    let _ = write!(
                        body,
                        "<tr><td><a class=\"output\" href=\"{}\">{}</a></td><td>{}</td><td>{}{own}</td>\
                         <td class=\"{v}\">{v}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        escape(&output_href(&p.project, &o.id)),
                        escape(&o.file_name),
                        escape(&o.workspace),
                        escape(&o.requester),
                        escape(&o.state),
                        o.reviews.len(),
                        escape(o.created_at.as_deref().unwrap_or("")),
                        v = verdict_of(o),
                    );
                }
                body.push_str("</table>");
            }
        }
        body.push_str("</section>");
    }
    layout("Outputs awaiting review", Some(viewer), &body)
}

/// A notice above the output, after a decision was relayed.
pub fn decided_notice(decision: Decision) -> String {
    let what = match decision {
        Decision::Approve => "approved",
        Decision::Reject => "rejected",
        Decision::RequestChanges => "sent back for changes",
    };
    format!("You {what} this output; the API recorded your decision.")
}

/// `/review/{project}/{id}`: metadata, the checks and the rendered file, the reviews so far,
/// and the decision forms (not for the requester, and only while the output is open).
pub fn output_page(
    viewer: &Viewer<'_>,
    project: &str,
    output: &Output,
    content: Result<&[u8], &ApiError>,
    notice: Option<&str>,
) -> String {
    let mut body = String::new();
    if let Some(n) = notice {
        let _ = write!(body, "<p class=\"notice\" id=\"notice\">{}</p>", escape(n));
    }
    let _ = write!(body, "<h1>{}</h1><table class=\"meta\" id=\"meta\">", escape(&output.file_name));
    let size = output.size.to_string();
    let rows: [(&str, &str); 8] = [
        ("project", project),
        ("workspace", &output.workspace),
        ("requester", &output.requester),
        ("state", &output.state),
        ("size (bytes)", &size),
        ("SHA-256", &output.sha256),
        ("submitted", output.created_at.as_deref().unwrap_or("")),
        ("updated", output.updated_at.as_deref().unwrap_or("")),
    ];
    for (k, v) in rows {
        let _ = write!(body, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    body.push_str("</table>");

    let own = output.requester == viewer.user;
    body.push_str("<h2>Decision</h2>");
    if own {
        body.push_str(
            "<p class=\"own\" id=\"own\">You submitted this output: you cannot review it. Another output \
             checker of the project must.</p>",
        );
    } else if !output.open_for_review() {
        let _ = write!(
            body,
            "<p id=\"closed\">This output is {}: it is no longer open for review.</p>",
            escape(&output.state)
        );
    } else if output.reviews.iter().any(|r| r.reviewer == viewer.user) {
        body.push_str("<p id=\"already\">You have reviewed this output; decisions are final.</p>");
    } else {
        body.push_str("<div class=\"decisions\">");
        let base = output_href(project, &output.id);
        for d in Decision::ALL {
            let required = if d.needs_reason() { " required" } else { "" };
            let hint = if d.needs_reason() { "reason (required)" } else { "reason (optional)" };
            let _ = write!(
                body,
                "<form method=\"post\" action=\"{}/{}\" id=\"form-{p}\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <label>{hint}<textarea name=\"reason\" maxlength=\"{}\"{required}></textarea></label>\
                 <button type=\"submit\" id=\"{p}\">{}</button></form>",
                escape(&base),
                d.path(),
                escape(viewer.csrf),
                super::MAX_REASON,
                d.label(),
                p = d.path(),
            );
        }
        body.push_str("</div>");
    }

    body.push_str("<h2>Reviews</h2>");
    if output.reviews.is_empty() {
        body.push_str("<p id=\"reviews\">No reviews yet.</p>");
    } else {
        body.push_str(
            "<table class=\"list\" id=\"reviews\"><tr><th>reviewer</th><th>decision</th><th>reason</th><th>at</th></tr>",
        );
        for r in &output.reviews {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&r.reviewer),
                escape(&r.decision),
                escape(r.reason.as_deref().unwrap_or("")),
                escape(r.at.as_deref().unwrap_or(""))
            );
        }
        body.push_str("</table>");
    }

    let unchecked;
    let report = match &output.checks {
        Some(r) => r,
        None => {
            body.push_str("<p id=\"unchecked\">The automatic checks have not run on this output yet.</p>");
            unchecked = Report::from_results(vec![], vec![]);
            &unchecked
        }
    };
    match content {
        Ok(bytes) => body.push_str(&review_fragment(&output.file_name, bytes, report)),
        Err(e) => {
            // The checks are still worth seeing without the file.
            body.push_str(&review_fragment(&output.file_name, b"", report).replace(
                "<h3>File</h3>",
                &format!(
                    "<h3>File</h3><p class=\"refusal\" id=\"no-content\" data-code=\"{}\">The file is not shown: {}</p>",
                    escape(e.code()),
                    escape(&e.to_string())
                ),
            ));
        }
    }
    layout(&output.file_name, Some(viewer), &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_airlock::checks::{Policy, Submission, run};

    const CSV: &[u8] = b"region,men,women\nNorth,25,7\nSouth,30,40\n";

    fn output(requester: &str, state: &str, file: &str, bytes: &[u8]) -> Output {
        let report =
            run(&Submission { file_name: file, bytes, metadata: None, acro_results: None }, &Policy::default());
        Output {
            id: "o-1".into(),
            workspace: "alice".into(),
            file_name: file.into(),
            size: bytes.len() as u64,
            sha256: "ab".into(),
            requester: requester.into(),
            state: state.into(),
            checks: Some(report),
            reviews: vec![],
            created_at: Some("2026-12-07T01:00:00Z".into()),
            updated_at: None,
        }
    }

    const BOB: Viewer<'static> = Viewer { user: "bob@x", csrf: "tok-123" };

    #[test]
    fn the_failing_cell_is_marked_and_the_forms_carry_the_csrf_token() {
        let o = output("alice@x", "checked", "t.csv", CSV);
        let page = output_page(&BOB, "ward-7", &o, Ok(CSV), None);
        assert!(page.contains("<td class=\"fail\" title=\"minCellCount\">7</td>"), "{page}");
        for d in Decision::ALL {
            assert!(page.contains(&format!("action=\"/review/ward-7/o-1/{}\"", d.path())), "{page}");
        }
        assert_eq!(page.matches("name=\"csrf\" value=\"tok-123\"").count(), 4, "three decisions and sign-out");
        assert!(!page.contains("<script") && !page.contains("<style") && !page.contains("style="), "{page}");
    }

    #[test]
    fn the_requester_gets_no_forms() {
        let o = output("bob@x", "checked", "t.csv", CSV);
        let page = output_page(&BOB, "ward-7", &o, Ok(CSV), None);
        assert!(page.contains("id=\"own\""));
        assert!(!page.contains("/approve\""), "{page}");
        let closed = output_page(&BOB, "ward-7", &output("alice@x", "approved", "t.csv", CSV), Ok(CSV), None);
        assert!(closed.contains("id=\"closed\"") && !closed.contains("/approve\""));
    }

    #[test]
    fn everything_the_api_says_is_escaped() {
        let evil = "<script>alert(1)</script>\"'";
        let mut o = output(evil, "checked", "<img src=x onerror=alert(1)>.csv", CSV);
        o.workspace = evil.into();
        o.sha256 = evil.into();
        o.reviews.push(super::super::api_client::ReviewEntry {
            reviewer: evil.into(),
            decision: evil.into(),
            reason: Some(evil.into()),
            at: Some(evil.into()),
        });
        let viewer = Viewer { user: evil, csrf: "\"><script>" };
        let page = output_page(&viewer, "ward-7", &o, Ok(b"a,b\n<script>x</script>,3\n"), Some(evil));
        let list = list_page(&viewer, &[ProjectOutputs { project: evil.into(), outputs: Ok(vec![o.clone()]) }]);
        let err = error_page(Some(&viewer), evil, evil, evil, Some(evil));
        for p in [page, list, err] {
            assert!(!p.contains("<script") && !p.contains("<img src=x"), "{p}");
            assert!(p.contains("&lt;script&gt;"));
        }
    }

    #[test]
    fn a_refused_content_read_is_said_plainly_and_the_checks_still_show() {
        let o = output("alice@x", "checked", "t.csv", CSV);
        let e = ApiError::Refused {
            status: 403,
            code: "notAChecker".into(),
            message: "bob@x is not an output checker of this project".into(),
        };
        let page = output_page(&BOB, "ward-7", &o, Err(&e), None);
        assert!(page.contains("id=\"no-content\" data-code=\"notAChecker\""), "{page}");
        assert!(page.contains("minCellCount"));
    }

    #[test]
    fn images_are_data_uris() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        let o = output("alice@x", "checked", "f.png", png);
        let page = output_page(&BOB, "ward-7", &o, Ok(png), None);
        assert!(page.contains("src=\"data:image/png;base64,"), "{page}");
    }
}
