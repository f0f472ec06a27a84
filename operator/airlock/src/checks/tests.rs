//! Tables whose verdicts are worked out by hand (arithmetic in the comments), and the edge
//! cases a researcher's files bring: totals, suppressed cells, negative and decimal counts,
//! quoting, TSV, BOM/CRLF, ragged rows, header-less tables, huge lines, archives, non-UTF-8.

use super::*;

fn sub<'a>(name: &'a str, bytes: &'a [u8]) -> Submission<'a> {
    Submission { file_name: name, bytes, metadata: None, acro_results: None }
}

fn check(name: &str, body: &str) -> Report {
    run(&sub(name, body.as_bytes()), &Policy::default())
}

#[track_caller]
fn get<'a>(r: &'a Report, name: &str) -> &'a CheckResult {
    r.results.iter().find(|c| c.check == name).unwrap_or_else(|| panic!("no {name} result in {:#?}", r.results))
}

fn has(r: &Report, name: &str) -> bool {
    r.results.iter().any(|c| c.check == name)
}

fn cells(list: &[(usize, usize)]) -> Vec<Cell> {
    list.iter().map(|&(row, column)| Cell { row, column }).collect()
}

#[test]
fn a_clean_count_table_passes() {
    // Every count is at least 10 and none is 0: nothing to flag.
    let r = check("summary.csv", "region,men,women\nNorth,25,31\nSouth,18,40\n");
    assert_eq!(r.verdict, Verdict::Pass, "{:#?}", r.results);
    assert_eq!(get(&r, "minCellCount").verdict, Verdict::Pass);
    assert_eq!(get(&r, "zeros").verdict, Verdict::Pass);
    assert_eq!(get(&r, "dlp").verdict, Verdict::Pass);
    assert!(
        get(&r, "format").message.contains("label columns: 1; count columns: 2, 3"),
        "{}",
        get(&r, "format").message
    );
    assert!(!has(&r, "totals") && !has(&r, "suppressed"));
}

#[test]
fn one_cell_of_seven_fails_at_its_line_and_column() {
    // Line 2 "North,25,7": 0 < 7 < 10 fails; it is field 3. 25, 18, 40 pass.
    let r = check("table.csv", "region,men,women\nNorth,25,7\nSouth,18,40\n");
    assert_eq!(r.verdict, Verdict::Fail);
    let m = get(&r, "minCellCount");
    assert_eq!((m.verdict, m.cells.clone()), (Verdict::Fail, cells(&[(2, 3)])));
    assert!(m.message.starts_with("1 of 4 count cell(s) are below 10"), "{}", m.message);
}

#[test]
fn the_threshold_comes_from_the_policy() {
    // With minCellCount 5: 7 >= 5 passes; with 30: 25 and 18 fail too (7 still fails).
    let body = "region,men,women\nNorth,25,7\nSouth,18,40\n";
    let p = Policy { min_cell_count: 5, ..Policy::default() };
    assert_eq!(run(&sub("t.csv", body.as_bytes()), &p).verdict, Verdict::Pass);
    let p = Policy { min_cell_count: 30, ..Policy::default() };
    let r = run(&sub("t.csv", body.as_bytes()), &p);
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(2, 2), (2, 3), (3, 2)]));
}

#[test]
fn zeros_fail_only_when_disclosive() {
    // "F,0": a zero count at line 2, field 2; 12 passes.
    let body = "sex,cases\nF,0\nM,12\n";
    let r = check("z.csv", body);
    assert_eq!(get(&r, "zeros").cells, cells(&[(2, 2)]));
    assert_eq!(get(&r, "minCellCount").verdict, Verdict::Pass, "0 is a zero, not a small count");
    assert_eq!(r.verdict, Verdict::Fail);
    let p = Policy { zeros_disclosive: false, ..Policy::default() };
    let r = run(&sub("z.csv", body.as_bytes()), &p);
    assert_eq!(r.verdict, Verdict::Pass);
    assert!(!has(&r, "zeros"));
}

#[test]
fn suppressed_cells_are_counted_not_failed() {
    // Marked: (2,2) "*", (3,3) "<10", (4,2) "[c]", (4,3) "..", (5,3) empty. Shown: 12, 14, 11.
    let r = check("s.csv", "area,a,b\nX,*,12\nY,14,<10\nZ,[c],..\nW,11,\n");
    assert_eq!(r.verdict, Verdict::Pass, "{:#?}", r.results);
    let s = get(&r, "suppressed");
    assert_eq!(s.cells, cells(&[(2, 2), (3, 3), (4, 2), (4, 3), (5, 3)]));
    assert!(s.message.starts_with("5 cell(s) already suppressed"));
    // A column suppressed throughout is a count column: its cells are counted as suppressed;
    // an empty spacer column is not.
    let r = check("s.csv", "area,a,,b\nX,*,,12\nY,<10,,15\n");
    assert_eq!(get(&r, "suppressed").cells, cells(&[(2, 2), (3, 2)]));
    assert!(get(&r, "format").message.contains("count columns: 2, 4;"), "{}", get(&r, "format").message);
    // A first data row with nothing but markers is data, not a second header line.
    let r = check("s.csv", "area,a,b\nX,*,<10\nY,12,15\n");
    assert_eq!(get(&r, "suppressed").cells, cells(&[(2, 2), (2, 3)]));
    assert!(get(&r, "format").message.contains("1 header line(s), 2 data row(s)"));
}

#[test]
fn totals_left_out_of_suppressed_cells_pass_as_acro_writes_them() {
    // men: 25 + 18 = 43 = total. women: the visible 40 = total 40 (ACRO recomputes margins
    // after suppression, leaving the suppressed cell out): nothing can be subtracted.
    let r = check("t.csv", "region,men,women\nNorth,25,*\nSouth,18,40\nTotal,43,40\n");
    assert_eq!(get(&r, "totals").verdict, Verdict::Pass);
    assert_eq!(r.verdict, Verdict::Pass);
    assert!(get(&r, "format").message.contains("2 data row(s), 1 totals row(s)"));
}

#[test]
fn a_total_that_gives_back_a_suppressed_cell_fails() {
    // women: 47 - 40 = 7, and only one cell is suppressed: the total reveals it (7).
    let r = check("t.csv", "region,men,women\nNorth,25,*\nSouth,18,40\nTotal,43,47\n");
    let t = get(&r, "totals");
    assert_eq!((t.verdict, t.cells.clone()), (Verdict::Fail, cells(&[(4, 3)])));
    assert_eq!(r.verdict, Verdict::Fail);
}

#[test]
fn a_total_above_its_rows_gives_away_a_hidden_group() {
    // 93 - (50 + 40) = 3: a category of 3 is missing from the table but not from the total.
    let r = check("t.csv", "group,n\nA,50\nB,40\nTotal,93\n");
    assert_eq!(get(&r, "totals").cells, cells(&[(4, 2)]));
    // 110 - 90 = 20 >= 10: the hidden part is itself big enough.
    let r = check("t.csv", "group,n\nA,50\nB,40\nTotal,110\n");
    assert_eq!(get(&r, "totals").verdict, Verdict::Pass);
    // 85 < 90: a total smaller than its parts (rounded? perturbed?) is for a person.
    let r = check("t.csv", "group,n\nA,50\nB,40\nTotal,85\n");
    assert_eq!((r.verdict, get(&r, "totals").verdict), (Verdict::Review, Verdict::Review));
}

#[test]
fn totals_are_checked_like_any_cell_as_acro_checks_its_margins() {
    // 4 and 3 fail, and so does their margin: All = 7 < 10. 4 + 3 = 7 adds up.
    let r = check("w.csv", "ward,n\nA,4\nB,3\nAll,7\n");
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(2, 2), (3, 2), (4, 2)]));
    assert_eq!(get(&r, "totals").verdict, Verdict::Pass);
}

#[test]
fn a_totals_column_is_checked_row_by_row() {
    // Line 2: 37 - 25 = 12 with one suppressed cell: the total gives the suppressed 12 back.
    // Line 3: 18 + 40 = 58 adds up.
    let r = check("c.csv", "region,men,women,Total\nNorth,25,*,37\nSouth,18,40,58\n");
    assert!(get(&r, "format").message.contains("totals columns: 4"));
    assert_eq!(get(&r, "totals").cells, cells(&[(2, 4)]));
}

#[test]
fn totals_on_top_are_compared_with_the_rows_below() {
    // All = 55 = 25 + 30.
    assert_eq!(get(&check("t.csv", "region,n\nAll,55\nNorth,25\nSouth,30\n"), "totals").verdict, Verdict::Pass);
    // All = 62: 62 - 55 = 7 hidden.
    assert_eq!(get(&check("t.csv", "region,n\nAll,62\nNorth,25\nSouth,30\n"), "totals").cells, cells(&[(2, 2)]));
}

#[test]
fn subtotals_and_a_grand_total() {
    // Group 1: 20 + 30 = 50 = subtotal; group 2: 15 + 25 = 40; grand total 90 = 50 + 40.
    let body = "sex,band,n\nF,young,20\nF,old,30\nF,Total,50\nM,young,15\nM,old,25\nM,Total,40\nGrand total,,90\n";
    let r = check("t.csv", body);
    assert_eq!(get(&r, "totals").verdict, Verdict::Pass, "{:#?}", r.results);
    assert_eq!(r.verdict, Verdict::Pass);
}

#[test]
fn negative_and_decimal_counts_are_for_review() {
    // -3 is not a count (ACRO: negative values → review); 12 still passes the threshold.
    let r = check("n.csv", "item,n\na,12\nb,-3\n");
    let v = get(&r, "values");
    assert_eq!((v.verdict, v.cells.clone()), (Verdict::Review, cells(&[(3, 2)])));
    assert!(v.message.contains("negative count at line 3, column 2"));
    assert_eq!(get(&r, "minCellCount").verdict, Verdict::Pass);
    assert_eq!(r.verdict, Verdict::Review);
    // 12.5 is not a count; 20.0 is (pandas' float counts).
    let r = check("d.csv", "item,n\na,12.5\nb,20.0\n");
    assert_eq!(get(&r, "values").cells, cells(&[(2, 2)]));
    assert_eq!(r.verdict, Verdict::Review);
    // A decimal does not hide a small count elsewhere: 3 still fails.
    let r = check("d.csv", "item,n\na,12.5\nb,3\n");
    assert_eq!(r.verdict, Verdict::Fail);
}

#[test]
fn unrecognised_text_in_a_count_column_is_for_review() {
    // "-" is not a marker (it often means zero): review, at line 3.
    let r = check("u.csv", "item,n\na,12\nb,-\nc,40\n");
    assert_eq!(get(&r, "values").cells, cells(&[(3, 2)]));
    assert_eq!(r.verdict, Verdict::Review);
}

#[test]
fn quoted_labels_with_commas_and_newlines_keep_file_lines() {
    // The record "North\nEast" spans lines 2-3; the 7 is on line 4, field 2.
    let body = "\"region, with comma\",n\n\"North\nEast\",25\n\"South, \"\"x\"\"\",7\n";
    let r = check("q.csv", body);
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(4, 2)]));
    assert!(get(&r, "format").message.contains("2 data row(s)"));
}

#[test]
fn tsv_bom_and_crlf() {
    // TSV: 3 at line 2, field 2.
    let r = check("t.tsv", "area\tn\nX\t3\nY\t30\n");
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(2, 2)]));
    assert!(get(&r, "format").message.starts_with("TSV table"));
    // BOM + CRLF: lines count as in an editor; 5 is on line 3.
    let r = check("b.csv", "\u{feff}area,n\r\nX,12\r\nY,5\r\n");
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(3, 2)]));
    assert_eq!(get(&r, "format").verdict, Verdict::Pass, "the BOM is not part of the header");
    // Old Mac CR-only lines and blank lines count too: 5 is on line 5.
    let r = check("m.csv", "area,n\rX,12\r\r\rY,5\r");
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(5, 2)]));
    let r = check("m.csv", "area,n\n\nX,12\r\n\r\nY,5\n");
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(5, 2)]));
}

#[test]
fn ragged_rows_are_for_review() {
    // The header has 3 fields; line 3 has 2 (missing field 3), line 4 has 4 (extra field 4).
    let r = check("r.csv", "area,a,b\nX,12,15\nY,14\nZ,11,13,99\n");
    let f = r.results.iter().find(|c| c.check == "format" && c.verdict == Verdict::Review).expect("format review");
    assert_eq!(f.cells, cells(&[(3, 3), (4, 4)]));
    assert_eq!(r.verdict, Verdict::Review);
}

#[test]
fn header_less_tables_check_every_row() {
    // No header: the first line is data; 7 at line 2, field 2.
    let r = check("h.csv", "North,25,31\nSouth,7,40\n");
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(2, 2)]));
    assert!(get(&r, "format").message.contains("0 header line(s)"));
    // A leading year column is a label, not a count of 2019.
    let r = check("y.csv", "2019,25,31\n2020,7,40\n");
    assert!(get(&r, "format").message.contains("label columns: 1;"), "{}", get(&r, "format").message);
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(2, 2)]));
}

#[test]
fn numeric_labels_named_in_the_header_and_a_pandas_index() {
    // "age" 5 is a label; the counts 12 and 15 pass.
    let r = check("a.csv", "age,n\n5,12\n6,15\n");
    assert_eq!(r.verdict, Verdict::Pass, "{:#?}", r.results);
    // pandas' unnamed index 0,1,2 in column 1 is a label; 0 there is not a zero count.
    let r = check("p.csv", ",n\n0,12\n1,15\n2,40\n");
    assert_eq!(r.verdict, Verdict::Pass, "{:#?}", r.results);
    // ...but 1,2,3 in a named count column are counts.
    let r = check("c.csv", "area,n\nA,1\nB,2\nC,3\n");
    assert_eq!(get(&r, "minCellCount").cells.len(), 3);
}

#[test]
fn a_huge_single_line_is_handled_without_a_panic() {
    // 4 MB in one line with no number: nothing to count, so review.
    let line = "x".repeat(4 << 20);
    let r = check("big.csv", &line);
    assert_eq!(r.verdict, Verdict::Review);
    assert_eq!(get(&r, "sdc").verdict, Verdict::Review);
    let r = check("big.txt", &line);
    assert_eq!(r.verdict, Verdict::Review);
}

#[test]
fn files_larger_than_the_limit_are_not_parsed() {
    let p = Policy { max_checked_bytes: 10, ..Policy::default() };
    let r = run(&sub("t.csv", b"region,n\nNorth,25\n"), &p);
    assert_eq!(r.results.len(), 1);
    assert_eq!((r.verdict, r.results[0].check.as_str()), (Verdict::Review, "format"));
    assert!(r.results[0].message.contains("18 bytes, more than the 10"));
}

/// A zip local file header that claims 4 GiB uncompressed from a few bytes (a zip bomb's
/// opening): we must not look inside.
fn zip_bomb() -> Vec<u8> {
    let mut z = b"PK\x03\x04\x14\x00\x00\x00\x08\x00".to_vec();
    z.extend_from_slice(&[0; 8]); // time, date, crc
    z.extend_from_slice(&0x0000_1000u32.to_le_bytes()); // compressed size
    z.extend_from_slice(&0xffff_ffffu32.to_le_bytes()); // uncompressed size
    z.extend_from_slice(&9u16.to_le_bytes());
    z.extend_from_slice(&0u16.to_le_bytes());
    z.extend_from_slice(b"table.csv");
    z.extend(std::iter::repeat_n(0u8, 64));
    z
}

#[test]
fn archives_zip_bombs_and_executables_are_refused_unexpanded() {
    let z = zip_bomb();
    for name in ["out.zip", "table.csv"] {
        let r = run(&sub(name, &z), &Policy::default());
        assert_eq!(r.verdict, Verdict::Refuse);
        assert_eq!(r.results.len(), 1, "only the format result: {:#?}", r.results);
        assert!(r.results[0].message.contains("zip archive"), "{}", r.results[0].message);
        assert!(r.results[0].message.contains("never expanded"));
        assert!(r.refusal().unwrap().contains("unpack and submit the files"), "{:?}", r.refusal());
    }
    for (name, bytes) in [("x.gz", &b"\x1f\x8b\x08\x00rest"[..]), ("model", b"\x7fELF\x02\x01\x01")] {
        let r = run(&sub(name, bytes), &Policy::default());
        assert_eq!(r.verdict, Verdict::Refuse, "{name}");
    }
    let mut pe = b"MZ".to_vec();
    pe.resize(0x80, 0);
    pe[0x3c] = 0x40;
    pe[0x40..0x44].copy_from_slice(b"PE\0\0");
    assert_eq!(run(&sub("tool.exe", &pe), &Policy::default()).verdict, Verdict::Refuse);
    // A table whose first cell starts "MZ" is a table, not a program.
    let r = run(&sub("t.csv", b"MZ code,n\nA,40\nB,44\n"), &Policy::default());
    assert_ne!(r.verdict, Verdict::Refuse);
    assert_eq!(r.refusal(), None);
}

#[test]
fn images_and_binaries_are_for_review_never_pass() {
    let r = run(&sub("plot.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), &Policy::default());
    assert_eq!(r.verdict, Verdict::Review);
    let svg = br#"<svg xmlns="http://www.w3.org/2000/svg"><text>n=3</text></svg>"#;
    let r = run(&sub("plot.svg", svg), &Policy::default());
    assert_eq!(r.verdict, Verdict::Review);
    assert_eq!(get(&r, "dlp").verdict, Verdict::Pass, "SVG is text: the DLP scan runs on it");
    // UTF-16 (BOM FF FE) is not read as text: the DLP scanner's text detectors skip it.
    let r = run(&sub("t.csv", b"\xff\xfer\0e\0g\0,\0n\0\n\0"), &Policy::default());
    assert_eq!(r.verdict, Verdict::Review);
    assert!(get(&r, "format").message.contains("UTF-16"), "{}", get(&r, "format").message);
    let r = run(&sub("data.bin", b"\0\x01\x02\x03binary\0\0"), &Policy::default());
    assert_eq!(r.verdict, Verdict::Review);
    assert!(get(&r, "format").message.contains("binary content"));
}

#[test]
fn non_utf8_tables_are_checked_and_sent_to_review() {
    // Latin-1 "Zürich": the counts (25, 12) pass, the encoding is unknown: review.
    let r = run(&sub("l.csv", b"area,n\nZ\xfcrich,25\nBern,12\n"), &Policy::default());
    assert_eq!(r.verdict, Verdict::Review);
    assert_eq!(get(&r, "minCellCount").verdict, Verdict::Pass);
    // A small count still fails whatever the encoding: fail beats review.
    let r = run(&sub("l.csv", b"area,n\nZ\xfcrich,25\nBern,2\n"), &Policy::default());
    assert_eq!(r.verdict, Verdict::Fail);
}

#[test]
fn text_that_is_not_a_table_is_for_a_person() {
    let r = check("model.txt", "OLS Regression Results\nR-squared: 0.41\nNo. Observations: 812\n");
    assert_eq!(r.verdict, Verdict::Review);
    assert_eq!(get(&r, "sdc").verdict, Verdict::Review);
    assert_eq!(get(&r, "dlp").verdict, Verdict::Pass);
}

#[test]
fn dlp_findings_fail_with_kind_count_and_place_never_the_value() {
    // A valid NHS number (mod-11) as a label on line 2, field 1.
    let r = check("p.csv", "patient,n\n943 476 5919,12\n");
    let d = get(&r, "dlp");
    assert_eq!((d.verdict, d.cells.clone()), (Verdict::Fail, cells(&[(2, 1)])));
    assert!(d.message.contains("nhsNumber ×1 (first at byte 10"), "{}", d.message);
    assert!(!d.message.contains("943 476") && !d.message.contains("4765919"));
    assert_eq!(r.verdict, Verdict::Fail);
    // In text: line 2, byte 13 of the line.
    let r = check("n.txt", "notes\ncontact me: alice@example.org\n");
    let d = get(&r, "dlp");
    assert_eq!(d.cells, cells(&[(2, 13)]));
    assert!(d.message.contains("email ×1"));
}

#[test]
fn residual_degrees_of_freedom() {
    let low = OutputMetadata { residual_dof: Some(5), ..OutputMetadata::default() };
    let ok = OutputMetadata { residual_dof: Some(806), ..OutputMetadata::default() };
    let body = b"region,n\nNorth,25\n";
    let mut s = sub("m.csv", body);
    s.metadata = Some(&low);
    let r = run(&s, &Policy::default());
    assert_eq!((r.verdict, get(&r, "residualDof").verdict), (Verdict::Fail, Verdict::Fail));
    s.metadata = Some(&ok);
    let r = run(&s, &Policy::default());
    assert_eq!((r.verdict, get(&r, "residualDof").verdict), (Verdict::Pass, Verdict::Pass));
}

fn contrib(row: usize, column: usize, values: &[f64]) -> CellContributions {
    CellContributions { cell: Cell { row, column }, values: values.to_vec() }
}

#[test]
fn dominance_and_p_ratio_on_declared_contributions() {
    let body = b"region,mean_income\nNorth,10.3\nSouth,12.0\nEast,11.3\n";
    let ones = |first: &[f64]| [first, &[1.0; 8]].concat();
    let meta = OutputMetadata {
        residual_dof: None,
        contributions: vec![
            // (2,2): total 50+45+8 = 103; top two 95/103 = 0.922 > 0.90 → dominance fails;
            // p-ratio (103-50-45)/50 = 8/50 = 0.16 >= 0.10 → passes.
            contrib(2, 2, &ones(&[50.0, 45.0])),
            // (3,2): 30 + 9×10 = 120; top two 40/120 = 0.33; (120-30-10)/30 = 2.67: passes both.
            contrib(3, 2, &[30.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]),
            // (4,2): 100+5+8 = 113; 105/113 = 0.929 > 0.90 fails; (113-100-5)/100 = 0.08 < 0.10 fails.
            contrib(4, 2, &ones(&[100.0, 5.0])),
        ],
    };
    let mut s = sub("m.csv", body);
    s.metadata = Some(&meta);
    let r = run(&s, &Policy::default());
    assert!(get(&r, "format").message.contains("magnitude columns: 2"), "{}", get(&r, "format").message);
    assert_eq!(get(&r, "dominance").cells, cells(&[(2, 2), (4, 2)]));
    assert_eq!(get(&r, "pRatio").cells, cells(&[(4, 2)]));
    assert!(!has(&r, "minCellCount"), "10 contributors each, no count columns");
    assert!(!has(&r, "contributions"), "every magnitude cell is declared: {:#?}", r.results);
    assert_eq!(r.verdict, Verdict::Fail);
}

#[test]
fn few_contributors_and_undeclared_cells() {
    // (2,2) has 3 contributors < 10 (ACRO counts contributors against the threshold); its top
    // two are 5+4 = 9 of 12 = 0.75 (passes N-K), (12-5-4)/5 = 0.6 (passes p-ratio).
    // (3,2) has no contributions: review.
    let body = b"region,sum income\nNorth,12\nSouth,40\n";
    let meta = OutputMetadata { residual_dof: None, contributions: vec![contrib(2, 2, &[5.0, 4.0, 3.0])] };
    let mut s = sub("m.csv", body);
    s.metadata = Some(&meta);
    let r = run(&s, &Policy::default());
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(2, 2)]));
    assert_eq!(get(&r, "dominance").verdict, Verdict::Pass);
    assert_eq!(get(&r, "contributions").cells, cells(&[(3, 2)]));
    // Without any contributions a magnitude table is for review.
    let r = check("m.csv", "region,mean income\nNorth,10.5\nSouth,12.25\n");
    assert_eq!((r.verdict, get(&r, "dominance").verdict), (Verdict::Review, Verdict::Review));
}

const ACRO_RESULTS: &str = r#"{"version": "0.4.8", "results": {
  "output_0": {"uid": "output_0", "status": "fail", "type": "table", "properties": {"method": "crosstab"},
    "files": [{"name": "output_0_0.csv", "sdc": {"summary": {"suppressed": false, "threshold": 2},
      "cells": {"threshold": [[0, 1], [2, 0]], "p-ratio": [], "nk-rule": []}}}],
    "outcome": {}, "command": "acro.crosstab(df.year, df.grant_type)",
    "summary": "fail; threshold: 2 cells may need suppressing; ", "timestamp": "t", "comments": [], "exception": ""}}}"#;

#[test]
fn acro_verdicts_are_shown_beside_ours_in_file_cells() {
    // ACRO's [0,1] is the first data row, second value: line 2, field 1 (label) + 2 = 3 → "3".
    // [2,0]: line 4, field 2 → "4". Our own check finds the same two cells.
    let body = b"year,G,N\n2010,15,3\n2011,12,25\n2012,4,30\n";
    let mut s = sub("outbox/output_0_0.csv", body);
    s.acro_results = Some(ACRO_RESULTS.as_bytes());
    let r = run(&s, &Policy::default());
    assert_eq!(r.acro.len(), 1);
    assert_eq!((r.acro[0].verdict, r.acro[0].cells.clone()), (Verdict::Fail, cells(&[(2, 3), (4, 2)])));
    assert!(r.acro[0].message.starts_with("ACRO output_0 (crosstab): fail; threshold: 2 cells"));
    assert_eq!(get(&r, "minCellCount").cells, cells(&[(2, 3), (4, 2)]));
    // pandas' index-name line under the header ("year,,") is not a value row for ACRO.
    let named = b"grant_type,G,N\nyear,,\n2010,15,3\n2011,12,25\n2012,4,30\n";
    let mut s2 = sub("output_0_0.csv", named);
    s2.acro_results = Some(ACRO_RESULTS.as_bytes());
    assert_eq!(run(&s2, &Policy::default()).acro[0].cells, cells(&[(3, 3), (5, 2)]));
    // ACRO never replaces ours: a pass from ACRO leaves our fail.
    let passing = ACRO_RESULTS.replace("\"status\": \"fail\"", "\"status\": \"pass\"");
    s.acro_results = Some(passing.as_bytes());
    let r = run(&s, &Policy::default());
    assert_eq!((r.verdict, r.acro[0].verdict), (Verdict::Fail, Verdict::Pass));
}

#[test]
fn acro_results_that_are_broken_or_silent() {
    let body = b"region,n\nNorth,25\n";
    let mut s = sub("clean.csv", body);
    s.acro_results = Some(b"{\"results\": [");
    let r = run(&s, &Policy::default());
    let a = get(&r, "acro");
    assert_eq!(a.verdict, Verdict::Review);
    assert!(a.message.contains("could not be read (not JSON"), "{}", a.message);
    assert_eq!(r.verdict, Verdict::Review, "a malformed results.json is a review, not an error");
    // Valid, but nothing about this file: noted beside ours, our pass stands.
    s.acro_results = Some(ACRO_RESULTS.as_bytes());
    let r = run(&s, &Policy::default());
    assert_eq!(r.verdict, Verdict::Pass);
    assert_eq!(r.acro[0].verdict, Verdict::Review);
    assert!(r.acro[0].message.contains("no output for clean.csv"));
}

#[test]
fn many_failing_cells_are_capped_in_the_list_not_in_the_count() {
    // 3,000 rows of "r,1": every one fails; 1,000 cells listed, all 3,000 counted.
    let mut body = String::from("row,n\n");
    for i in 0..3000 {
        body.push_str(&format!("r{i},1\n"));
    }
    let r = check("many.csv", &body);
    let m = get(&r, "minCellCount");
    assert_eq!(m.cells.len(), table::MAX_LISTED_CELLS);
    assert!(
        m.message.starts_with("3000 of 3000 count cell(s) are below 10 (and above 0) (first 1000 listed)"),
        "{}",
        m.message
    );
}

#[test]
fn reports_serialise_with_the_agreed_names() {
    let r = check("table.csv", "region,men,women\nNorth,25,7\n");
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["verdict"], "fail");
    let m = v["results"].as_array().unwrap().iter().find(|c| c["check"] == "minCellCount").unwrap();
    assert_eq!(m["cells"], serde_json::json!([{"row": 2, "column": 3}]));
    assert!(v.get("acro").is_none(), "empty acro is left out");
}

/// Property: for random count tables (labels quoted with commas and newlines, markers, zeros,
/// CRLF or LF), the failing cells are exactly those an independent oracle finds, at the file
/// lines the oracle counted while writing the file.
#[test]
fn random_tables_fail_exactly_the_small_cells() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(2026);
    let mut checked = 0;
    for case in 0..300 {
        let cols = rng.gen_range(1..5);
        let rows = rng.gen_range(1..40);
        let eol = if rng.gen_bool(0.5) { "\r\n" } else { "\n" };
        let mut body = String::from("label");
        for j in 0..cols {
            body.push_str(&format!(",c{j}"));
        }
        body.push_str(eol);
        let mut line = 2;
        let (mut small, mut zeros, mut suppressed) = (vec![], vec![], vec![]);
        for i in 0..rows {
            let start = line;
            match rng.gen_range(0..3) {
                0 => body.push_str(&format!("r{i}")),
                1 => body.push_str(&format!("\"r{i}, with a comma\"")),
                _ => {
                    body.push_str(&format!("\"r{i}{eol}on two lines\""));
                    line += 1;
                }
            }
            for j in 0..cols {
                let column = j + 2;
                match rng.gen_range(0..10) {
                    0 => {
                        body.push_str(",*");
                        suppressed.push(Cell { row: start, column });
                    }
                    1 => {
                        body.push_str(",0");
                        zeros.push(Cell { row: start, column });
                    }
                    _ => {
                        let n: u32 = rng.gen_range(1..40);
                        body.push_str(&format!(",{n}"));
                        if n < 10 {
                            small.push(Cell { row: start, column });
                        }
                    }
                }
            }
            body.push_str(eol);
            line += 1;
        }
        let r = check("p.csv", &body);
        let listed =
            |name: &str| r.results.iter().find(|c| c.check == name).map(|c| c.cells.clone()).unwrap_or_default();
        // A count column that came out all suppressed or zero-free still counts; one that holds
        // no number at all is "empty" and not checked: skip those rare cases.
        let want: Vec<String> = (2..cols + 2).map(|c| c.to_string()).collect();
        assert!(
            get(&r, "format").message.contains(&format!("count columns: {};", want.join(", "))),
            "case {case}:\n{body}"
        );
        checked += 1;
        assert_eq!(listed("minCellCount"), small, "case {case}:\n{body}");
        assert_eq!(listed("zeros"), zeros, "case {case}:\n{body}");
        assert_eq!(listed("suppressed"), suppressed, "case {case}:\n{body}");
        let expected = if !small.is_empty() || !zeros.is_empty() { Verdict::Fail } else { Verdict::Pass };
        assert_eq!(r.verdict, expected, "case {case}:\n{body}\n{:#?}", r.results);
    }
    assert!(checked > 250, "only {checked} of 300 cases had every count column recognised");
}

#[test]
fn empty_files_and_header_only_tables_are_for_review() {
    for (name, body) in [("e.csv", ""), ("h.csv", "region,n\n"), ("e.txt", "")] {
        let r = check(name, body);
        assert_eq!(r.verdict, Verdict::Review, "{name}: {:#?}", r.results);
        assert_eq!(get(&r, "sdc").verdict, Verdict::Review, "{name}");
    }
}

#[test]
fn a_sites_extra_dlp_patterns_apply() {
    let det = noexit_dlp::Detectors::new(&[noexit_dlp::ExtraPattern {
        name: "studyId".into(),
        regex: r"STUDY-\d{6}".into(),
    }])
    .unwrap();
    let body = b"id,n\nSTUDY-123456,12\n";
    let r = run_with_detectors(&sub("s.csv", body), &Policy::default(), &det);
    let d = get(&r, "dlp");
    assert_eq!((d.verdict, d.cells.clone()), (Verdict::Fail, cells(&[(2, 1)])));
    assert!(d.message.contains("studyId ×1") && !d.message.contains("123456"), "{}", d.message);
    assert_eq!(check("s.csv", "id,n\nSTUDY-123456,12\n").verdict, Verdict::Pass, "built-ins only");
}

/// Property: arbitrary bytes (from an alphabet rich in CSV syntax, markers and digits), under
/// any name, with or without a results.json and contributions, never panic, always give a
/// report whose verdict is the worst of its results, and never pass unless read as a table.
#[test]
fn arbitrary_input_never_panics_and_never_passes_unread() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    const ALPHABET: &[u8] = b",,,\t\n\r\"\"*<>0123456789.-e%c[]NA Total\xef\xbb\xbf\xff\x00@";
    let mut rng = StdRng::seed_from_u64(7);
    let meta = OutputMetadata {
        residual_dof: None,
        contributions: vec![contrib(2, 2, &[5.0, f64::NAN]), contrib(usize::MAX, usize::MAX, &[])],
    };
    for case in 0..2000 {
        let len = rng.gen_range(0..300);
        let bytes: Vec<u8> = (0..len).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())]).collect();
        let name = ["a.csv", "a.tsv", "a.txt", "a.svg", "a"][case % 5];
        let acro = format!(
            r#"{{"results": {{"o": {{"status": "fail", "files": [{{"name": "{name}", "sdc": {{"cells": {{"threshold": [[{}, {}], [18446744073709551615, 1]]}}}}}}]}}}}}}"#,
            rng.gen_range(0..5),
            rng.gen_range(0..5)
        );
        let s = Submission {
            file_name: name,
            bytes: &bytes,
            metadata: if case % 3 == 0 { Some(&meta) } else { None },
            acro_results: if case % 2 == 0 { Some(acro.as_bytes()) } else { None },
        };
        let r = run(&s, &Policy::default());
        assert_eq!(Some(r.verdict), r.results.iter().map(|c| c.verdict).max(), "case {case}");
        if r.verdict == Verdict::Pass {
            assert!(name.ends_with("sv"), "case {case}: {name} passed: {:#?}", r.results);
        }
        let _ = crate::render::review_html(name, &bytes, &r);
    }
}
