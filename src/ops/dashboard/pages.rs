//! The dashboard's pages, as maud templates: every value from a row goes in
//! through maud's escaping, never as markup. Elements the live updates
//! change carry `data-` attributes that `assets/app.js` looks for.

use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};

use crate::queue::Check;
use crate::store::dashboard::{
    age, BatchLine, Cursor, JobDetail, JobFilter, JobLine, LeaseHolder, Minute, TypeCount,
};
use crate::store::stats::QueueSnapshot;
use crate::store::JobStatus;

pub struct Overview {
    pub snapshot: QueueSnapshot,
    pub by_type: Vec<TypeCount>,
    pub hour: Vec<Minute>,
    pub checks: Vec<Check>,
    pub leases: Vec<LeaseHolder>,
    pub batches: Vec<BatchLine>,
}

pub struct JobList<'a> {
    pub filter: &'a JobFilter,
    pub lines: &'a [JobLine],
    pub next: Option<Cursor>,
    pub first_page: bool,
}

fn layout(csrf: &str, title: &str, active: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf-token" content=(csrf);
                title { (title) " · docworker" }
                link rel="stylesheet" href="/ui/assets/style.css";
                script src="/ui/assets/app.js" defer {}
            }
            body {
                header {
                    nav {
                        a.brand href="/ui/" { "docworker" }
                        a.on[active == "overview"] href="/ui/" { "Overview" }
                        a.on[active == "batches"] href="/ui/batches" { "Batches" }
                        a.on[active == "jobs"] href="/ui/jobs" { "Jobs" }
                    }
                    div.token {
                        label for="token" { "Dashboard token" }
                        input #token type="password" autocomplete="off" placeholder="for retry and cancel";
                        button #token-use type="button" { "Use" }
                        span #token-state {}
                    }
                }
                main { (body) }
                footer { span #live { "live updates: connecting" } }
            }
        }
    }
    .into_string()
}

pub fn error(message: &str) -> String {
    layout(
        "",
        "Error",
        "",
        html! { h1 { "Not shown" } p.error { (message) } },
    )
}

fn when(at: Option<DateTime<Utc>>) -> String {
    at.map_or("-".into(), |t| {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    })
}

/// A query string's value, percent-encoded.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn progress(attr: &str, id: &str, done: i64, total: i64) -> Markup {
    let (value, max) = (done.max(0), total.max(1));
    html! {
        @match attr {
            "batch" => progress data-batch=(id) value=(value) max=(max) {},
            _ => progress data-job=(id) value=(value) max=(max) {},
        }
    }
}

/// A small bar chart of the last hour, one bar per minute, oldest left.
fn chart(label: &str, values: &[(i32, f64)], unit: &str) -> Markup {
    const W: f64 = 6.0;
    const H: f64 = 60.0;
    let max = values.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    let scale = if max > 0.0 { H / max } else { 0.0 };
    html! {
        figure.chart {
            figcaption { (label) " (max " (format!("{max:.2}")) " " (unit) ")" }
            svg width=(W * 60.0) height=(H) viewBox=(format!("0 0 {} {H}", W * 60.0)) role="img" aria-label=(label) {
                @for (i, (ago, v)) in values.iter().enumerate() {
                    @let h = (v * scale).max(if *v > 0.0 { 1.0 } else { 0.0 });
                    rect x=(i as f64 * W) y=(format!("{:.1}", H - h)) width=(W - 1.0) height=(format!("{h:.1}")) {
                        title { (format!("{v:.2} {unit}, {ago} min ago")) }
                    }
                }
            }
        }
    }
}

fn batch_rows(batches: &[BatchLine]) -> Markup {
    html! {
        table.batches {
            thead { tr { th { "Batch" } th { "Created" } th { "Status" } th { "Progress" } th {} } }
            tbody {
                @for b in batches {
                    @let id = b.id.to_string();
                    tr {
                        td { a href={ "/ui/jobs?batch=" (id) } { code { (id[..8]) } } }
                        td { (when(b.created_at)) }
                        td data-batch-status=(id) { (b.status) }
                        td {
                            (progress("batch", &id, (b.completed + b.failed) as i64, b.total as i64))
                            " "
                            span data-batch-text=(id) {
                                (b.completed) " completed, " (b.failed) " failed of " (b.total)
                            }
                        }
                        td {
                            button type="button" data-action={ "/ui/api/batches/" (id) "/retry" } { "Retry failed" }
                            " " span.result {}
                        }
                    }
                }
            }
        }
    }
}

pub fn overview(csrf: &str, o: &Overview) -> String {
    let statuses: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
    let types: Vec<&str> = {
        let mut t: Vec<&str> = o.by_type.iter().map(|c| c.task_type.as_str()).collect();
        t.dedup();
        t
    };
    let count = |t: &str, s: &str| {
        o.by_type
            .iter()
            .find(|c| c.task_type == t && c.status == s)
            .map_or(0, |c| c.count)
    };
    let finished: Vec<(i32, f64)> = o.hour.iter().map(|m| (m.ago, m.finished as f64)).collect();
    let pickup: Vec<(i32, f64)> = o
        .hour
        .iter()
        .map(|m| (m.ago, m.pickup_secs.unwrap_or(0.0)))
        .collect();
    let body = html! {
        h1 { "Overview" }
        section.cards {
            @for (status, n) in &o.snapshot.by_status {
                div.card { span.label { (status.as_str()) } span.value data-count=(status.as_str()) { (n) } }
            }
            div.card { span.label { "due now" } span.value data-due { (o.snapshot.due) } }
            div.card { span.label { "oldest due job waiting" } span.value data-oldest { (crate::store::dashboard::human(o.snapshot.oldest_due_age)) } }
        }
        section.charts {
            (chart("Jobs finished per minute, last hour", &finished, "jobs"))
            (chart("Mean pickup latency per minute, last hour", &pickup, "s"))
        }
        section {
            h2 { "By task type" }
            table {
                thead { tr { th { "task type" } @for s in &statuses { th { (s) } } } }
                tbody {
                    @for t in &types {
                        tr { td { a href={ "/ui/jobs?task_type=" (encode(t)) } { (t) } } @for s in &statuses { td.num { (count(t, s)) } } }
                    }
                }
            }
        }
        section {
            h2 { "Dependencies" }
            ul.checks {
                @for c in &o.checks {
                    li.ok[c.ok].down[!c.ok] { strong { (c.name) } ": " (c.detail) }
                }
            }
        }
        section {
            h2 { "Workers holding leases" }
            @if o.leases.is_empty() {
                p { "None: no job is running." }
            } @else {
                table {
                    thead { tr { th { "worker" } th { "jobs" } th { "soonest lease ends in" } } }
                    tbody {
                        @for l in &o.leases {
                            tr { td { code { (l.worker) } } td.num { (l.jobs) } td { (format!("{:.0} s", l.soonest_expiry_secs)) } }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Recent batches" }
            (batch_rows(&o.batches))
            p { a href="/ui/batches" { "All batches" } }
        }
    };
    layout(csrf, "Overview", "overview", body)
}

pub fn batches(csrf: &str, batches: &[BatchLine]) -> String {
    let body = html! {
        h1 { "Batches" }
        p { "The newest hundred. A batch's jobs: follow its id." }
        (batch_rows(batches))
    };
    layout(csrf, "Batches", "batches", body)
}

fn filter_query(f: &JobFilter) -> String {
    let mut q = String::new();
    let mut add = |k: &str, v: &str| q.push_str(&format!("&{k}={}", encode(v)));
    if let Some(v) = &f.status {
        add("status", v);
    }
    if let Some(v) = &f.task_type {
        add("task_type", v);
    }
    if let Some(v) = &f.batch {
        add("batch", &v.to_string());
    }
    if let Some(v) = &f.filename {
        add("q", v);
    }
    q
}

pub fn jobs(csrf: &str, list: &JobList<'_>) -> String {
    let f = list.filter;
    let now = Utc::now();
    let body = html! {
        h1 { "Jobs" }
        form.filters method="get" action="/ui/jobs" {
            label { "status " select name="status" {
                option value="" { "any" }
                @for s in JobStatus::ALL {
                    option value=(s.as_str()) selected[f.status.as_deref() == Some(s.as_str())] { (s.as_str()) }
                }
            } }
            label { "task type " input name="task_type" value=(f.task_type.clone().unwrap_or_default()) size="8"; }
            label { "batch " input name="batch" value=(f.batch.map(|b| b.to_string()).unwrap_or_default()) size="36"; }
            label { "file name " input name="q" value=(f.filename.clone().unwrap_or_default()) size="16"; }
            button type="submit" { "Filter" }
        }
        table.jobs {
            thead { tr { th { "file" } th { "type" } th { "status" } th { "stage" } th { "chunks" } th { "attempt" } th { "created" } } }
            tbody {
                @for j in list.lines {
                    @let id = j.id.to_string();
                    tr {
                        td { a href={ "/ui/jobs/" (id) } { @if j.filename.is_empty() { "(no file) " code { (id[..8]) } } @else { (j.filename) } } }
                        td { (j.task_type) }
                        td data-job-status=(id) { (j.status) }
                        td data-job-stage=(id) { (j.stage.clone().unwrap_or_default()) }
                        td { (progress("job", &id, j.completed_chunks as i64, j.total_chunks as i64)) " " span data-job-text=(id) { (j.completed_chunks) "/" (j.total_chunks) } }
                        td.num { (j.attempt) }
                        td { (age(j.created_at, now)) " ago" }
                    }
                }
            }
        }
        @if list.lines.is_empty() { p { "No job matches." } }
        p.pages {
            @if !list.first_page { a href={ "/ui/jobs?" (filter_query(f).trim_start_matches('&')) } { "Newest" } " " }
            @if let Some(next) = list.next { a rel="next" href={ "/ui/jobs?after=" (next.encode()) (filter_query(f)) } { "Older" } }
        }
    };
    layout(csrf, "Jobs", "jobs", body)
}

pub fn job(csrf: &str, d: &JobDetail, records: &Result<usize, String>) -> String {
    let j = &d.line;
    let id = j.id.to_string();
    let finished = matches!(j.status.as_str(), "completed" | "error" | "cancelled");
    let took = match (d.started_at, d.finished_at) {
        (Some(s), Some(f)) => format!("{:.1} s", (f - s).num_milliseconds() as f64 / 1000.0),
        _ => "-".into(),
    };
    let body = html! {
        h1 { @if j.filename.is_empty() { "Job " code { (id) } } @else { (j.filename) } }
        p.actions {
            @if finished {
                button type="button" data-action={ "/ui/api/jobs/" (id) "/retry" } { "Retry" }
            } @else {
                button type="button" data-action={ "/ui/api/jobs/" (id) "/cancel" } { "Cancel" }
            }
            " " span.result {}
        }
        dl.job {
            dt { "id" } dd { code { (id) } }
            dt { "batch" } dd { @if let Some(b) = j.batch_id { a href={ "/ui/jobs?batch=" (b) } { code { (b) } } } @else { "-" } }
            dt { "task type" } dd { (j.task_type) }
            dt { "status" } dd data-job-status=(id) { (j.status) }
            dt { "stage" } dd data-job-stage=(id) { (j.stage.clone().unwrap_or_default()) }
            dt { "chunks" } dd { (progress("job", &id, j.completed_chunks as i64, j.total_chunks as i64)) " " span data-job-text=(id) { (j.completed_chunks) "/" (j.total_chunks) } }
            dt { "attempt" } dd { span data-job-attempt=(id) { (j.attempt) } " of " (d.max_attempts) }
            dt { "document" } dd { code { (d.document_id) } }
            dt { "records in Chroma" } dd #records { @match records { Ok(n) => (n), Err(e) => span.error { "not known: " (e) } } }
            dt { "file" } dd { (d.file_path.clone().unwrap_or_else(|| "-".into())) }
            dt { "held by" } dd { (d.locked_by.clone().unwrap_or_else(|| "-".into())) }
            dt { "created" } dd { (when(j.created_at)) }
            dt { "due" } dd { (when(d.run_at)) }
            dt { "started" } dd { (when(d.started_at)) }
            dt { "finished" } dd { (when(d.finished_at)) " (" (took) ")" }
            dt { "message" } dd.error { (d.error_message.clone().unwrap_or_default()) }
        }
        h2 { "Error history" }
        @if d.errors.is_empty() {
            p { "No failed attempt." }
        } @else {
            table.errors {
                thead { tr { th { "attempt" } th { "kind" } th { "at" } th { "message" } } }
                tbody {
                    @for e in &d.errors {
                        @let field = |k: &str| e.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).unwrap_or_default();
                        tr { td.num { (field("attempt")) } td { (field("kind")) } td { (field("at")) } td { (field("message")) } }
                    }
                }
            }
        }
        @if let Some(result) = &d.result {
            h2 { "Result" }
            pre { (serde_json::to_string_pretty(result).unwrap_or_default()) }
        }
    };
    layout(csrf, &j.filename, "jobs", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_from_rows_are_text_never_markup() {
        let line = JobLine {
            id: uuid::Uuid::from_u128(1),
            batch_id: None,
            filename: "<img src=x onerror=alert(1)>.pdf".into(),
            task_type: "ingest".into(),
            status: "error".into(),
            stage: Some("\"><script>alert(2)</script>".into()),
            completed_chunks: 0,
            total_chunks: 0,
            attempt: 1,
            created_at: None,
        };
        let page = jobs(
            "csrf",
            &JobList {
                filter: &JobFilter {
                    filename: Some("\"><b>".into()),
                    ..JobFilter::default()
                },
                lines: &[line],
                next: None,
                first_page: true,
            },
        );
        assert!(
            page.contains("&lt;img src=x onerror=alert(1)&gt;.pdf"),
            "{page}"
        );
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<b>"), "{page}");
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
